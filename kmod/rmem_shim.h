/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The narrow interface between rmem's Rust driver (rmem_main.rs) and its C
 * half (rmem_shim.c). The C half owns what the kernel offers no Rust
 * abstraction for: the device-private pagemap, migrate_vma_* and the
 * mmu_interval_notifier. Everything here is plain integers and opaque
 * pointers so the Rust side declares it by hand (mod shim in rmem_main.rs).
 */
#ifndef RMEM_SHIM_H
#define RMEM_SHIM_H

#include <linux/types.h>

struct rmem_att;
struct rmem_batch;

/* Implemented in Rust, called from C. */

/*
 * A CPU touched a remote page: ask the agent for the contents of `handle`
 * and wait until it wrote them to `kaddr` (PAGE_SIZE bytes). Sleeps.
 * `fault` tells a CPU fault from a detach bringing pages back.
 * Returns 0, -EINTR when a signal is pending (the fault is retried), or
 * another negative errno (the faulting task gets SIGBUS).
 */
int rmem_rs_fetch(u64 handle, u32 tgid, unsigned long addr, void *kaddr, bool fault);
/* A remote page was freed (may be called in atomic context). */
void rmem_rs_wake(void);

/* Implemented in C, called from Rust. */

int rmem_pool_init(unsigned long capacity_pages);
void rmem_pool_exit(void);
u64 rmem_pool_capacity(void);
u64 rmem_pool_in_use(void);
/* Moves up to `max` freed handles into `out`; returns how many. Atomic-safe. */
u32 rmem_pool_take_freed(u64 *out, u32 max);

bool rmem_capable_admin(void);
u32 rmem_current_tgid(void);

/* Attach a process's address space; NULL with *err set on failure. */
struct rmem_att *rmem_att_new(s32 pid, u64 start, u64 len, bool all, int *err);
/* Bring every remote page of the attachment back; pages restored or -errno. */
long rmem_att_restore(struct rmem_att *a);
void rmem_att_free(struct rmem_att *a);
s32 rmem_att_pid(const struct rmem_att *a);

/*
 * Unmap and copy up to `max` present pages of [start, ...) within one VMA.
 * `data` and `addrs` are user pointers. Returns NULL with *npages = 0 when
 * nothing could be taken (not an error), NULL with *err set on failure.
 */
struct rmem_batch *rmem_evict_begin(struct rmem_att *a, u64 start, u32 max,
				    u64 data, u64 addrs, u32 timeout_ms,
				    u32 *npages, int *err);
u32 rmem_batch_npages(const struct rmem_batch *b);
/* Moves the batch's pages to device memory; returns pages moved or -errno. */
long rmem_evict_commit(struct rmem_batch *b, const u64 *handles, u8 *status);
/* Puts the pages back (idempotent; also what the timeout does). */
void rmem_evict_abort(struct rmem_batch *b);
/* Aborts if still pending, stops the timeout and frees the batch. */
void rmem_batch_free(struct rmem_batch *b);

#endif /* RMEM_SHIM_H */
