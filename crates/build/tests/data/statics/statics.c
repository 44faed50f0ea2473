/* Two functions with a static local of the same name: gcc numbers them
 * (count.0, count.1) with one counter per unit, so a patch that adds a
 * static local can shift the numbers of the others. */
#include <stdio.h>
#include <unistd.h>

__attribute__((noinline)) int ticks(void)
{
    static int count;
    return ++count;
}

__attribute__((noinline)) int tens(void)
{
    static int count;
    return count += 10;
}

int main(void)
{
    for (;;) {
        printf("%d %d\n", ticks(), tens());
        fflush(stdout);
        sleep(1);
    }
}
