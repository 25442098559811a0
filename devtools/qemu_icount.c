/* Count the guest instructions an emulated process executes: a QEMU TCG plugin for user mode
 * (qemu-aarch64 -plugin ./libicount.so,out=FILE PROGRAM ...), plugin API version 1 (QEMU 7.2).
 * Debian ships no qemu-plugin.h, so the five functions used here are declared by hand.
 * Every translated block gets a callback that adds its instruction count to the counter of the
 * thread (vCPU) running it; each thread writes only its own slot, so no atomics on the hot path.
 * Built and used by devtools/pi_projection.py. */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

typedef uint64_t qemu_plugin_id_t;
struct qemu_plugin_tb;
struct qemu_info_t;
typedef void (*translate_cb)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
typedef void (*exec_cb)(unsigned int vcpu_index, void *udata);
typedef void (*exit_cb)(qemu_plugin_id_t id, void *udata);
enum { CB_NO_REGS = 0 };

void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, translate_cb cb);
void qemu_plugin_register_vcpu_tb_exec_cb(struct qemu_plugin_tb *tb, exec_cb cb, int flags,
                                          void *udata);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, exit_cb cb, void *udata);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

#define SLOTS 1024
static uint64_t per_thread[SLOTS];
static uint64_t spill; /* threads beyond SLOTS share this one, atomically */
static char out_path[4096] = "icount.txt";

static void block_ran(unsigned int vcpu, void *udata)
{
    uint64_t n = (uint64_t)(uintptr_t)udata;
    if (vcpu < SLOTS)
        per_thread[vcpu] += n;
    else
        __atomic_fetch_add(&spill, n, __ATOMIC_RELAXED);
}

static void block_translated(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    (void)id;
    qemu_plugin_register_vcpu_tb_exec_cb(tb, block_ran, CB_NO_REGS,
                                         (void *)(uintptr_t)qemu_plugin_tb_n_insns(tb));
}

static void finished(qemu_plugin_id_t id, void *udata)
{
    (void)id;
    (void)udata;
    uint64_t total = spill, threads = 0;
    for (int i = 0; i < SLOTS; i++) {
        total += per_thread[i];
        threads += per_thread[i] != 0;
    }
    FILE *f = fopen(out_path, "w");
    if (f) {
        fprintf(f, "instructions %llu\nthreads %llu\n", (unsigned long long)total,
                (unsigned long long)threads);
        fclose(f);
    }
}

__attribute__((visibility("default"))) int
qemu_plugin_install(qemu_plugin_id_t id, const struct qemu_info_t *info, int argc, char **argv)
{
    (void)info;
    for (int i = 0; i < argc; i++)
        if (strncmp(argv[i], "out=", 4) == 0)
            snprintf(out_path, sizeof out_path, "%s", argv[i] + 4);
    qemu_plugin_register_vcpu_tb_trans_cb(id, block_translated);
    qemu_plugin_register_atexit_cb(id, finished, NULL);
    return 0;
}
