/* Benchmark target with many functions: many_100 ... many_599 (500 of them), each called ROUNDS times, to
 * measure how long attaching and detaching 500 probes takes.
 *
 *   many [ROUNDS]   (default 3)   ->   many calls=N */
#include <stdio.h>
#include <stdlib.h>

#define F(n) __attribute__((noinline)) int many_##n(int x) { __asm__ volatile(""); return x + n; }
#define TEN(d) F(d##0) F(d##1) F(d##2) F(d##3) F(d##4) F(d##5) F(d##6) F(d##7) F(d##8) F(d##9)
#define HUNDRED(h) TEN(h##0) TEN(h##1) TEN(h##2) TEN(h##3) TEN(h##4) TEN(h##5) TEN(h##6) TEN(h##7) TEN(h##8) TEN(h##9)
HUNDRED(1) HUNDRED(2) HUNDRED(3) HUNDRED(4) HUNDRED(5)
#undef F

#define F(n) many_##n,
static int (*const functions[])(int) = { HUNDRED(1) HUNDRED(2) HUNDRED(3) HUNDRED(4) HUNDRED(5) };

int main(int argc, char **argv)
{
    int rounds = argc > 1 ? atoi(argv[1]) : 3;
    volatile int sink = 0;
    unsigned calls = 0;
    for (int r = 0; r < rounds; r++)
        for (unsigned i = 0; i < sizeof functions / sizeof *functions; i++, calls++)
            sink = functions[i](sink);
    printf("many calls=%u\n", calls);
    return 0;
}
