/* The work both nested and httpserver do: recursion to trace, in each executable (not in libgreet.so). */
#ifndef WORK_H
#define WORK_H

long fib(int n);
long compute(int n);

#endif
