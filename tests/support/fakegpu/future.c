/* A driver library built against a glibc newer than any test image's: it needs the
   symbol version GLIBC_2.99 (from stub-libc.c), as host GL libraries on a new
   distribution need GLIBC_2.34 and more from an old image. */
extern int capsid_from_the_future(void);

int glDispatchStub(void) { return capsid_from_the_future(); }
