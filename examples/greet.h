#ifndef GREET_H
#define GREET_H

#include <stddef.h>

/* Writes "Hello, NAME!" into out; returns the length of the greeting. */
int greet(const char *name, char *out, size_t out_size);

#endif
