/* The MPI test program of capsid's tests and benchmarks.
 *   mpitest hello              each rank prints "rank R of N on HOST"
 *   mpitest pingpong BYTES N   ranks 0 and 1 exchange BYTES N times, check every byte,
 *                              and rank 0 prints "pingpong BYTES MB/s"
 *   mpitest exit RANK CODE     rank RANK exits with CODE after a barrier, the others 0
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int pingpong(int rank, long bytes, int rounds) {
    unsigned char *buffer = malloc((size_t)bytes);
    if (buffer == NULL) return 2;
    double start = 0;
    for (int round = -1; round < rounds; round++) {  /* round -1 warms up */
        if (round == 0) { MPI_Barrier(MPI_COMM_WORLD); start = MPI_Wtime(); }
        unsigned char seed = (unsigned char)(round * 7 + 1);
        if (rank == 0) {
            for (long i = 0; i < bytes; i++) buffer[i] = (unsigned char)(seed + i);
            MPI_Send(buffer, (int)bytes, MPI_BYTE, 1, 0, MPI_COMM_WORLD);
            MPI_Recv(buffer, (int)bytes, MPI_BYTE, 1, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            for (long i = 0; i < bytes; i++)
                if (buffer[i] != (unsigned char)(seed + i + 1)) {
                    fprintf(stderr, "pingpong: byte %ld is wrong in round %d\n", i, round);
                    return 3;
                }
        } else if (rank == 1) {
            MPI_Recv(buffer, (int)bytes, MPI_BYTE, 0, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            for (long i = 0; i < bytes; i++) {
                if (buffer[i] != (unsigned char)(seed + i)) {
                    fprintf(stderr, "pingpong: byte %ld came wrong in round %d\n", i, round);
                    return 3;
                }
                buffer[i]++;
            }
            MPI_Send(buffer, (int)bytes, MPI_BYTE, 0, 0, MPI_COMM_WORLD);
        }
    }
    if (rank == 0) {
        double seconds = MPI_Wtime() - start;
        printf("pingpong %ld %.1f MB/s\n", bytes, 2.0 * bytes * rounds / seconds / 1e6);
    }
    free(buffer);
    return 0;
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, size, length, code = 0;
    char host[MPI_MAX_PROCESSOR_NAME];
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    MPI_Get_processor_name(host, &length);
    const char *mode = argc > 1 ? argv[1] : "hello";
    if (strcmp(mode, "hello") == 0) {
        printf("rank %d of %d on %s\n", rank, size, host);
    } else if (strcmp(mode, "pingpong") == 0 && argc > 3 && size >= 2) {
        code = pingpong(rank, atol(argv[2]), atoi(argv[3]));
    } else if (strcmp(mode, "exit") == 0 && argc > 3) {
        MPI_Barrier(MPI_COMM_WORLD);
        if (rank == atoi(argv[2])) code = atoi(argv[3]);
    } else {
        if (rank == 0) fprintf(stderr, "usage: mpitest hello|pingpong BYTES N|exit RANK CODE\n");
        code = 2;
    }
    fflush(stdout);
    if (code != 0 && strcmp(mode, "exit") == 0) exit(code);  /* as a failing rank does */
    MPI_Finalize();
    return code;
}
