/* The encryption alone of a CURVE reader's messages, as _peers.c boxes them:
 *     box_cost REPS SIZE...     (the sizes of one message's frames)
 * Each frame is boxed with crypto_box_easy_afternm (the session key precomputed once, a nonce
 * per frame, the flags byte in front), REPS times; prints the CPU ns per message. */
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

int main(int argc, char **argv)
{
    if (argc < 3 || sodium_init() < 0)
        return 2;
    long reps = atol(argv[1]);
    int n = argc - 2;
    size_t max = 0, sizes[16];
    for (int i = 0; i < n && i < 16; i++) {
        sizes[i] = (size_t)atol(argv[i + 2]);
        if (sizes[i] > max)
            max = sizes[i];
    }
    unsigned char pk[crypto_box_PUBLICKEYBYTES], sk[crypto_box_SECRETKEYBYTES];
    unsigned char key[crypto_box_BEFORENMBYTES], nonce[crypto_box_NONCEBYTES] = { 0 };
    crypto_box_keypair(pk, sk);
    if (crypto_box_beforenm(key, pk, sk) != 0)
        return 2;
    unsigned char *plain = calloc(1, max + 1), *box = malloc(max + 1 + crypto_box_MACBYTES);
    struct timespec t0, t1;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t0);
    for (long r = 0; r < reps; r++) {
        for (int i = 0; i < n && i < 16; i++) {
            nonce[23]++;
            crypto_box_easy_afternm(box, plain, sizes[i] + 1, nonce, key);
        }
    }
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t1);
    double ns = (t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec);
    printf("%.1f\n", ns / reps);
    free(plain);
    free(box);
    return 0;
}
