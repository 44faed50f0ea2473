/* tally(): a second file with its own static `counter`. */
static int counter;

int tally(void)
{
    return ++counter;
}
