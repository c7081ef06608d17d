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

/* Implemented in Rust, called from C. */

struct rmem_fetch;
/*
 * Queue a request for the agent: the contents of `handle` go to `kaddr`
 * (PAGE_SIZE bytes), then rmem_fetch_complete(f, 0). `fault` tells a CPU
 * fault from a detach. Returns the request id (0: no memory; U64_MAX: no
 * agent, and a fetch already timed out: fail now) and the fault timeout in
 * jiffies.
 */
u64 rmem_rs_fetch_queue(u64 handle, u32 tgid, unsigned long addr, void *kaddr,
			bool fault, struct rmem_fetch *f, unsigned long *timeout);
/*
 * Withdraw request `id`; true if it was answered already (the result in f
 * stands). After it returns nobody touches f or kaddr.
 */
bool rmem_rs_fetch_cancel(u64 id, bool timed_out);
/* A remote page was freed (may be called in atomic context). */
void rmem_rs_wake(void);
/* The fault timeout (the fault_timeout_ms parameter), in jiffies. */
unsigned long rmem_rs_fault_timeout(void);

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
/* What the attachment covers (`all`: every mapping), and whether its process exited. */
void rmem_att_describe(const struct rmem_att *a, s32 *pid, u64 *start, u64 *len,
		       bool *all, bool *exited);

/*
 * Copy up to `max` present pages of [start, ...) within one mapping to the
 * user buffer `data`, their addresses to `addrs`; the pages stay mapped.
 * Returns how many, or -errno.
 */
long rmem_evict_copy(struct rmem_att *a, u64 start, u32 max, u64 data, u64 addrs);
/*
 * Move the copied pages whose contents still equal `data` (kernel memory,
 * n pages, at ascending `addrs`) to device pages holding `handles`;
 * status[k] = 1 for each page moved. Returns pages moved or -errno.
 */
long rmem_evict_commit(struct rmem_att *a, u64 start, u32 max, u32 n,
		       const u64 *addrs, const u64 *handles, const u8 *data, u8 *status);
void rmem_fetch_complete(struct rmem_fetch *f, int result);
/* Most pages a fault brings back ahead of itself (0: none). */
#define RMEM_PREFETCH_LIMIT 64
void rmem_set_prefetch_max(u32 pages);
/* Pages brought back ahead of a fault so far. */
u64 rmem_prefetched_pages(void);
/* Faults that dropped the mmap_lock while their pages were fetched. */
u64 rmem_retried_faults(void);
/* Faults that failed because their page could not move back in time. */
u64 rmem_stuck_faults(void);
/* Pages eviction left in RAM, by why (RMEM_SKIP_*). */
u64 rmem_skipped_pages(u32 why);
#define RMEM_SKIP_KSM 0
#define RMEM_SKIP_LOCKED 1
#define RMEM_SKIP_MAPPING 2
#define RMEM_SKIP_KINDS 3
bool rmem_module_get(void);
void rmem_module_put(void);

#endif /* RMEM_SHIM_H */
