/* A stand-in for the NVIDIA driver's libcuda.so.1: the calls a program makes first. */
#include <string.h>

int cuInit(unsigned int flags) { return flags == 0 ? 0 : 1; }

int cuDriverGetVersion(int *version) { *version = 12020; return 0; }

int cuDeviceGetCount(int *count) { *count = 1; return 0; }

int cuDeviceGet(int *device, int ordinal) { *device = ordinal; return ordinal == 0 ? 0 : 101; }

int cuDeviceGetName(char *name, int length, int device) {
    if (device != 0 || length < 1) return 101;
    strncpy(name, "Capsid Fake GPU", (size_t)length - 1);
    name[length - 1] = '\0';
    return 0;
}
