/* redis_numbers_check.c: differential check of the redis_numbers patch
 * (crates/fixtures/programs/patches/redis_numbers.c, #included as
 * PATCH_SOURCE) against the originals in Debian's redis src/util.c,
 * linked from the exact source package. Exits 0 when every case agrees
 * (return value, output value, every byte of the output buffer), else
 * prints the first disagreement and exits 1. The optional argument is
 * the number of random cases (default 2,000,000) after the exhaustive
 * and boundary ones. */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include PATCH_SOURCE

int string2ll(const char *s, size_t slen, long long *value);
int string2l(const char *s, size_t slen, long *lval);
int ull2string(char *dst, size_t dstlen, unsigned long long value);
int ll2string(char *dst, size_t dstlen, long long svalue);

static unsigned long long cases;

static void fail(const char *what, const char *text, size_t len) {
    printf("disagreement in %s on %zu bytes:", what, len);
    for (size_t i = 0; i < len; i++)
        printf(" %02x", (unsigned char)text[i]);
    printf("\n");
    exit(1);
}

static void parse_both(const char *text, size_t len) {
    long long a = 0x5a5a5a5a5a5a5a5aLL, b = a;
    if (string2ll(text, len, &a) != string2ll_v2(text, len, &b) || a != b)
        fail("string2ll", text, len);
    if (string2ll(text, len, NULL) != string2ll_v2(text, len, NULL))
        fail("string2ll(NULL)", text, len);
    long la = 0x3c3c3c3c3c3c3c3cL, lb = la;
    if (string2l(text, len, &la) != string2l_v2(text, len, &lb) || la != lb)
        fail("string2l", text, len);
    cases++;
}

static void format_both(long long value) {
    for (size_t len = 0; len <= 24; len++) {
        char a[32], b[32];
        memset(a, 0x77, sizeof a);
        memset(b, 0x77, sizeof b);
        if (ll2string(a, len, value) != ll2string_v2(b, len, value) || memcmp(a, b, sizeof a))
            fail("ll2string", (char *)&value, sizeof value);
        memset(a, 0x77, sizeof a);
        memset(b, 0x77, sizeof b);
        unsigned long long u = (unsigned long long)value;
        if (ull2string(a, len, u) != ull2string_v2(b, len, u) || memcmp(a, b, sizeof a))
            fail("ull2string", (char *)&value, sizeof value);
        cases++;
    }
}

static unsigned long long state = 0x9e3779b97f4a7c15ULL;
static unsigned long long next_random(void) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
}

int main(int argc, char **argv) {
    long random_cases = argc > 1 ? atol(argv[1]) : 2000000;
    char text[32];
    /* Every string of up to 3 bytes. */
    parse_both(text, 0);
    for (int a = 0; a < 256; a++) {
        text[0] = (char)a;
        parse_both(text, 1);
        for (int b = 0; b < 256; b++) {
            text[1] = (char)b;
            parse_both(text, 2);
            for (int c = 0; c < 256; c++) {
                text[2] = (char)c;
                parse_both(text, 3);
            }
        }
    }
    /* Every decimal spelling near each power of ten and the limits,
     * signed, with a byte changed or appended. */
    static const char alphabet[] = "0123456789-+ a\0";
    long long anchors[64];
    int anchor_count = 0;
    long long power = 1;
    for (int i = 0; i < 19; i++, power *= 10) {
        anchors[anchor_count++] = power;
        anchors[anchor_count++] = -power;
    }
    anchors[anchor_count++] = LLONG_MAX;
    anchors[anchor_count++] = LLONG_MIN;
    anchors[anchor_count++] = 0;
    for (int i = 0; i < anchor_count; i++) {
        for (long long delta = -3; delta <= 3; delta++) {
            long long value = anchors[i];
            if (!__builtin_add_overflow(anchors[i], delta, &value))
                format_both(value);
            int len = snprintf(text, sizeof text, "%lld", value);
            parse_both(text, (size_t)len);
            for (int at = 0; at <= len && at < 22; at++) {
                for (size_t k = 0; k < sizeof alphabet; k++) {
                    char changed[32];
                    memcpy(changed, text, sizeof changed);
                    changed[at] = alphabet[k];
                    parse_both(changed, (size_t)(at == len ? len + 1 : len));
                }
            }
        }
    }
    /* Beyond the limits: 19-21 digit spellings just out of range. */
    const char *outside[] = {"9223372036854775808", "-9223372036854775809", "18446744073709551615",
                             "18446744073709551616", "-18446744073709551616", "99999999999999999999",
                             "-99999999999999999999", "100000000000000000000", "000000000000000000001"};
    for (size_t i = 0; i < sizeof outside / sizeof outside[0]; i++)
        parse_both(outside[i], strlen(outside[i]));
    /* Random values and random digit strings. */
    for (long i = 0; i < random_cases; i++) {
        unsigned long long r = next_random();
        long long value = (long long)(r >> (next_random() % 64));
        if (next_random() & 1)
            value = -value;
        format_both(value);
        size_t len = (size_t)(next_random() % 23);
        for (size_t k = 0; k < len; k++)
            text[k] = (next_random() % 16) ? (char)('0' + next_random() % 10) : alphabet[next_random() % sizeof alphabet];
        parse_both(text, len);
    }
    printf("equivalent in %llu cases\n", cases);
    return 0;
}

/* util.c's other functions call sds and sha256 code this check never
 * runs: stand-ins so it links without the rest of redis. */
void sdscat(void) { abort(); }
void sdscatfmt(void) { abort(); }
void sdscatsds(void) { abort(); }
void sdsempty(void) { abort(); }
void sdsfree(void) { abort(); }
void sdsnew(void) { abort(); }
void sdsrange(void) { abort(); }
void sdstrim(void) { abort(); }
void sha256_final(void) { abort(); }
void sha256_init(void) { abort(); }
void sha256_update(void) { abort(); }
