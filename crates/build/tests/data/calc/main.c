/* Reads numbers on stdin, answers "compute(x) tally() limit" per line. */
#include <stdio.h>
#include <stdlib.h>

int compute(int x);
int tally(void);
extern int limit;

int main(void)
{
    char line[64];
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready\n");
    while (fgets(line, sizeof line, stdin)) {
        int x = atoi(line);
        printf("%d %d %d\n", compute(x), tally(), limit);
    }
    return 0;
}
