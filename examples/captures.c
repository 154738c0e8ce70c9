/* Calls whose arguments and results are worth reading, for the capture tests: run_query(query, limit) calls
 * find_rows(query, limit, exact, flags, token) once per case of a fixed table (long strings, an empty one, a
 * NULL, negative and huge numbers), and open_record(path) once per path. The program prints each call's
 * arguments and result itself, so the test compares every captured attribute with what the call really had.
 *
 *   captures
 *
 * stdout, one line per call, fields separated by tabs (strings as hex, so any byte survives; NULL as -):
 *   find_rows  QUERY  LIMIT  EXACT  FLAGS  TOKEN(8 bytes, hex)  RESULT
 *   run_query  QUERY  LIMIT  RESULT
 *   open_record  PATH  RESULT
 * then `done calls=N`. */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int calls;

static void print_hex(const char *s)
{
    if (!s) {
        fputs("-", stdout);
        return;
    }
    if (!*s)
        fputs("\"\"", stdout);
    for (; *s; s++)
        printf("%02x", (unsigned char)*s);
}

/* rows found: at most limit; -22 (EINVAL) for a negative limit, -2 (ENOENT) for a NULL query. */
__attribute__((noinline)) int find_rows(const char *query, int limit, bool exact, unsigned long flags,
                                        const unsigned char *token)
{
    int rows;
    if (limit < 0) {
        rows = -22;
    } else if (!query) {
        rows = -2;
    } else {
        int found = (int)((strlen(query) + exact + (flags & 3)) % 9);
        rows = found < limit ? found : limit;
    }
    calls++;
    printf("find_rows\t");
    print_hex(query);
    printf("\t%d\t%d\t%lu\t", limit, exact, flags);
    for (int i = 0; i < 8; i++)
        printf("%02x", token[i]);
    printf("\t%d\n", rows);
    return rows;
}

__attribute__((noinline)) long run_query(const char *query, int limit)
{
    static const unsigned char token[8] = {0xde, 0xad, 0xbe, 0xef, 0x00, 0x01, 0x7f, 0x80};
    int rows = find_rows(query, limit, limit % 2 == 0, (unsigned long)limit * 0x9E3779B97F4A7C15UL, token);
    long result = rows < 0 ? -1 : rows * 10L;
    calls++;
    printf("run_query\t");
    print_hex(query);
    printf("\t%d\t%ld\n", limit, result);
    return result;
}

/* A file descriptor-like number, or -1 for a path under /missing. */
__attribute__((noinline)) int open_record(const char *path)
{
    int fd = strncmp(path, "/missing", 8) == 0 ? -1 : 3 + (int)(strlen(path) % 5);
    calls++;
    printf("open_record\t");
    print_hex(path);
    printf("\t%d\n", fd);
    return fd;
}

int main(void)
{
    static char long_query[1200];
    memset(long_query, 'q', sizeof(long_query) - 1);
    memcpy(long_query, "SELECT ", 7);
    const char *queries[] = {"SELECT 1", "", "SELECT name FROM users WHERE id = 42", NULL, long_query,
                             "caf\xc3\xa9 \xe2\x98\x95", "x"};
    const int limits[] = {5, 3, -1, 4, 1000, 7, 0};
    for (unsigned i = 0; i < sizeof(queries) / sizeof(queries[0]); i++)
        run_query(queries[i], limits[i]);
    const char *paths[] = {"/etc/hostname", "/missing/file", "/var/lib/data.db"};
    for (unsigned i = 0; i < sizeof(paths) / sizeof(paths[0]); i++)
        open_record(paths[i]);
    printf("done calls=%d\n", calls);
    return 0;
}
