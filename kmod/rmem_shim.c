// SPDX-License-Identifier: GPL-2.0
/*
 * rmem_shim.c: the C half of rmem.ko.
 *
 * It owns the C-only structures, following lib/test_hmm.c, the kernel's
 * reference device-private driver:
 *  - the pool: MEMORY_DEVICE_PRIVATE pagemaps grown in 64 MiB chunks, a free
 *    list of device pages, and per page the remote handle of its data;
 *  - eviction (system page -> device page) and fault-back (device page ->
 *    system page) with migrate_vma_setup / _pages / _finalize;
 *  - one mmu_interval_notifier per attached address space.
 * Everything that is protocol (the agent, requests, ioctls) is in Rust.
 *
 * Lock order (outermost first):
 *   the driver's ctl mutex (Rust) -> mmap_lock of the target mm
 *     -> device page lock / source page locks (taken by migrate_vma_setup)
 *       -> pool.lock (spinlock, irqsave)
 * pool.grow_lock is taken with no page lock held (device pages for a commit
 * are allocated before its setup). A prefetch slot's lock (rmem_ra) is taken
 * alone: nothing nests in it.
 *
 * Fetches sleep with the device pages they bring back locked, never with a
 * lock of ours held; the agent's reply takes only the driver's request-queue
 * mutex. Whether the target's mmap_lock is held meanwhile depends on the
 * fault:
 *  - a first try (FAULT_FLAG_ALLOW_RETRY, neither TRIED nor RETRY_NOWAIT)
 *    does not migrate: it queues the fetches, drops the mmap_lock
 *    (release_fault_lock), waits, leaves each fetched page in its device
 *    page's staging slot and returns VM_FAULT_RETRY, like swap-in. The
 *    target's mmap/munmap/mprotect go on while the agent answers;
 *  - the retry, a fault that finds its page staged, and a fault that may not
 *    drop the lock (TRIED, RETRY_NOWAIT, no ALLOW_RETRY) migrate with the
 *    mmap_lock held for read; only pages without a staged copy are fetched
 *    then, and those waits hold the mmap_lock as before. So do detach
 *    restores.
 * With the mmap_lock dropped, a first try holds its device pages locked and
 * referenced, and takes nothing after that but pool.lock and the request
 * queue's mutex; it never takes the mmap_lock again before it unlocked them
 * (the arch code retakes it after do_swap_page's unlock_page). Under the
 * mmap_lock, device page locks are only trylocked (do_swap_page,
 * migrate_vma_setup) or waited for by a fault (which then retries), and no
 * writer of the mmap_lock (munmap, mremap, mprotect, fork) locks a device
 * page, so nothing waits in a cycle. Another fault on one of those pages
 * sleeps on its lock with its own mmap_lock held for read, as it did before.
 */
#include <linux/bitmap.h>
#include <linux/capability.h>
#include <linux/hash.h>
#include <linux/highmem.h>
#include <linux/ioport.h>
#include <linux/kernel.h>
#include <linux/log2.h>
#include <linux/memremap.h>
#include <linux/migrate.h>
#include <linux/mm.h>
#include <linux/mmu_notifier.h>
#include <linux/module.h>
#include <linux/pid.h>
#include <linux/sched/mm.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/userfaultfd_k.h>

#include "rmem_shim.h"

#define RMEM_CHUNK_BYTES (64UL << 20)
#define RMEM_CHUNK_PAGES (RMEM_CHUNK_BYTES >> PAGE_SHIFT)
#define RMEM_NO_HANDLE (~0ULL)
#define RMEM_RESTORE_STEP 64UL
#define RMEM_MAX_BATCH 512

/* The pages' contents are reached through page_address(): no highmem. */
static_assert(!IS_ENABLED(CONFIG_HIGHMEM));

/* A device page whose fault-backs the kernel refuses (rmem_fault_stuck). */
struct rmem_stuck {
	unsigned long since;	/* jiffies of the episode's first; 0: none */
	unsigned long last;	/* jiffies of its latest */
};

struct rmem_chunk {
	struct dev_pagemap pagemap;
	struct resource *res;
	u64 *handles;		/* per page; RMEM_NO_HANDLE when free */
	/*
	 * Per page, what a first try of a fault left for the next migration
	 * of it (rmem_stage): a system page holding its contents, an ERR_PTR
	 * (the fetch of the page that faulted failed: its retry fails alike,
	 * at once), or NULL. Under pool.lock; written only by the holder of
	 * the device page's lock and a reference, so the page cannot be freed
	 * under a writer, and emptied by folio_free.
	 */
	struct page **staged;
	/*
	 * Per page, when a fault first found it could not move the page back
	 * although nothing failed (the kernel kept refusing the migration),
	 * in jiffies; 0 when not stuck. Bounds such faults by the fault
	 * timeout instead of letting them retry forever. Under pool.lock;
	 * cleared by folio_free.
	 */
	struct rmem_stuck *stuck;
};

static struct {
	struct mutex grow_lock;	/* chunks, nchunks */
	spinlock_t lock;	/* free, freed, the counters, chunk handles, staged */
	struct page *free;	/* ready for use, linked via zone_device_data */
	struct page *freed;	/* freed but not yet reported to the agent */
	struct rmem_chunk **chunks;
	unsigned int nchunks, max_chunks;
	u64 in_use, freed_count;
} pool;

/* The pgmap owner: tells our own migrations from other mm events. */
static char rmem_owner;

static vm_fault_t rmem_migrate_to_ram(struct vm_fault *vmf);
static void rmem_folio_free(struct folio *folio);

static const struct dev_pagemap_ops rmem_pagemap_ops = {
	.folio_free = rmem_folio_free,
	.migrate_to_ram = rmem_migrate_to_ram,
};

static struct rmem_chunk *page_chunk(struct page *page)
{
	return container_of(page_pgmap(page), struct rmem_chunk, pagemap);
}

static unsigned long page_index_in_chunk(struct page *page)
{
	return page_to_pfn(page) - (page_chunk(page)->pagemap.range.start >> PAGE_SHIFT);
}

static u64 page_handle(struct page *page)
{
	return page_chunk(page)->handles[page_index_in_chunk(page)];
}

static void set_page_handle(struct page *page, u64 handle)
{
	unsigned long flags;

	spin_lock_irqsave(&pool.lock, flags);
	page_chunk(page)->handles[page_index_in_chunk(page)] = handle;
	spin_unlock_irqrestore(&pool.lock, flags);
}

/* What a first try left for `page`, without taking it (the caller holds its lock). */
static struct page *page_staged(struct page *page)
{
	unsigned long flags;
	struct page *staged;

	spin_lock_irqsave(&pool.lock, flags);
	staged = page_chunk(page)->staged[page_index_in_chunk(page)];
	spin_unlock_irqrestore(&pool.lock, flags);
	return staged;
}

/*
 * Takes what a first try left for device page `page` (a system page, now
 * the caller's, unlocked with one reference; an ERR_PTR; or NULL). The
 * caller holds the page's lock.
 */
static struct page *take_staged(struct page *page)
{
	struct page **slot;
	unsigned long flags;
	struct page *staged;

	spin_lock_irqsave(&pool.lock, flags);
	slot = &page_chunk(page)->staged[page_index_in_chunk(page)];
	staged = *slot;
	*slot = NULL;
	spin_unlock_irqrestore(&pool.lock, flags);
	return staged;
}

/*
 * Leaves `staged` (a system page with `page`'s contents, or an ERR_PTR) for
 * the next migration of `page`. The caller holds the page's lock and a
 * reference, so folio_free cannot run before this and frees it after. A
 * page already staged stays (the slot holds the first copy; a second one is
 * freed), and a copy beats an error.
 */
static void set_staged(struct page *page, struct page *staged)
{
	struct page **slot, *drop = staged;
	unsigned long flags;

	spin_lock_irqsave(&pool.lock, flags);
	slot = &page_chunk(page)->staged[page_index_in_chunk(page)];
	if (!*slot || (IS_ERR(*slot) && !IS_ERR(staged))) {
		drop = NULL;
		*slot = staged;
	}
	spin_unlock_irqrestore(&pool.lock, flags);
	if (!IS_ERR_OR_NULL(drop))
		put_page(drop);
}

/* ---- the pool of device-private pages ---------------------------------- */

static int rmem_pool_grow(void)
{
	struct rmem_chunk *chunk;
	unsigned long pfn, first, i;
	unsigned long flags;
	void *ptr;
	int ret;

	mutex_lock(&pool.grow_lock);
	if (READ_ONCE(pool.free)) {	/* somebody else grew it meanwhile */
		mutex_unlock(&pool.grow_lock);
		return 0;
	}
	if (pool.nchunks == pool.max_chunks) {
		mutex_unlock(&pool.grow_lock);
		return -ENOSPC;
	}
	ret = -ENOMEM;
	chunk = kzalloc_obj(*chunk);
	if (!chunk)
		goto out;
	chunk->handles = kvmalloc_array(RMEM_CHUNK_PAGES, sizeof(u64), GFP_KERNEL);
	if (!chunk->handles)
		goto free_chunk;
	for (i = 0; i < RMEM_CHUNK_PAGES; i++)
		chunk->handles[i] = RMEM_NO_HANDLE;
	chunk->staged = kvcalloc(RMEM_CHUNK_PAGES, sizeof(*chunk->staged), GFP_KERNEL);
	chunk->stuck = kvcalloc(RMEM_CHUNK_PAGES, sizeof(*chunk->stuck), GFP_KERNEL);
	if (!chunk->staged || !chunk->stuck)
		goto free_handles;
	chunk->res = request_free_mem_region(&iomem_resource, RMEM_CHUNK_BYTES, "rmem");
	if (IS_ERR_OR_NULL(chunk->res)) {
		ret = chunk->res ? PTR_ERR(chunk->res) : -ENOMEM;
		goto free_handles;
	}
	chunk->pagemap.type = MEMORY_DEVICE_PRIVATE;
	chunk->pagemap.range.start = chunk->res->start;
	chunk->pagemap.range.end = chunk->res->end;
	chunk->pagemap.nr_range = 1;
	chunk->pagemap.ops = &rmem_pagemap_ops;
	chunk->pagemap.owner = &rmem_owner;
	ptr = memremap_pages(&chunk->pagemap, numa_node_id());
	if (IS_ERR_OR_NULL(ptr)) {
		ret = ptr ? PTR_ERR(ptr) : -EFAULT;
		goto release;
	}
	first = chunk->pagemap.range.start >> PAGE_SHIFT;
	spin_lock_irqsave(&pool.lock, flags);
	for (pfn = first; pfn < first + RMEM_CHUNK_PAGES; pfn++) {
		struct page *page = pfn_to_page(pfn);

		page->zone_device_data = pool.free;
		pool.free = page;
	}
	pool.chunks[pool.nchunks++] = chunk;
	spin_unlock_irqrestore(&pool.lock, flags);
	mutex_unlock(&pool.grow_lock);
	pr_info("rmem: device-private chunk %u added (%lu MiB, pfns %#lx-%#lx)\n",
		pool.nchunks, RMEM_CHUNK_BYTES >> 20, first, first + RMEM_CHUNK_PAGES);
	return 0;

release:
	release_mem_region(chunk->pagemap.range.start, RMEM_CHUNK_BYTES);
free_handles:
	kvfree(chunk->stuck);
	kvfree(chunk->staged);
	kvfree(chunk->handles);
free_chunk:
	kfree(chunk);
out:
	mutex_unlock(&pool.grow_lock);
	return ret;
}

/* A locked device page with one reference and `handle`, or NULL. */
static struct page *rmem_pool_alloc(u64 handle)
{
	struct page *page;
	unsigned long flags;
	int tries;

	for (tries = 0; tries < 2; tries++) {
		spin_lock_irqsave(&pool.lock, flags);
		page = pool.free;
		if (page) {
			pool.free = page->zone_device_data;
			page->zone_device_data = NULL;
			pool.in_use++;
			page_chunk(page)->handles[page_index_in_chunk(page)] = handle;
		}
		spin_unlock_irqrestore(&pool.lock, flags);
		if (page) {
			/* Device pages in use pin the module: rmmod waits for them. */
			__module_get(THIS_MODULE);
			zone_device_page_init(page, page_pgmap(page), 0);
			return page;
		}
		if (rmem_pool_grow())
			return NULL;
	}
	return NULL;
}

/*
 * Called when the last reference to a device page goes; may be atomic.
 * A copy staged for it (the range was unmapped, or the task died, between a
 * first try and its retry) goes too: dropping an order-0 system page is
 * fine in atomic context.
 */
static void rmem_folio_free(struct folio *folio)
{
	struct page *page = &folio->page;
	struct page **slot, *staged;
	unsigned long flags;
	bool report;

	spin_lock_irqsave(&pool.lock, flags);
	slot = &page_chunk(page)->staged[page_index_in_chunk(page)];
	staged = *slot;
	*slot = NULL;
	page_chunk(page)->stuck[page_index_in_chunk(page)].since = 0;
	report = page_handle(page) != RMEM_NO_HANDLE;
	if (report) {
		/* Reported to the agent first; reused only after that. */
		page->zone_device_data = pool.freed;
		pool.freed = page;
		pool.freed_count++;
	} else {
		page->zone_device_data = pool.free;
		pool.free = page;
	}
	pool.in_use--;
	spin_unlock_irqrestore(&pool.lock, flags);
	if (!IS_ERR_OR_NULL(staged))
		put_page(staged);
	module_put(THIS_MODULE);
	if (report)
		rmem_rs_wake();
}

u32 rmem_pool_take_freed(u64 *out, u32 max)
{
	unsigned long flags;
	u32 n = 0;

	spin_lock_irqsave(&pool.lock, flags);
	while (n < max && pool.freed) {
		struct page *page = pool.freed;
		struct rmem_chunk *chunk = page_chunk(page);
		unsigned long idx = page_index_in_chunk(page);

		pool.freed = page->zone_device_data;
		pool.freed_count--;
		out[n++] = chunk->handles[idx];
		chunk->handles[idx] = RMEM_NO_HANDLE;
		page->zone_device_data = pool.free;
		pool.free = page;
	}
	spin_unlock_irqrestore(&pool.lock, flags);
	return n;
}

u64 rmem_pool_capacity(void)
{
	return (u64)pool.max_chunks * RMEM_CHUNK_PAGES;
}

u64 rmem_pool_in_use(void)
{
	return READ_ONCE(pool.in_use);
}

int rmem_pool_init(unsigned long capacity_pages)
{
	int ret;

	mutex_init(&pool.grow_lock);
	spin_lock_init(&pool.lock);
	pool.max_chunks = max(1UL, DIV_ROUND_UP(capacity_pages, RMEM_CHUNK_PAGES));
	pool.chunks = kcalloc(pool.max_chunks, sizeof(*pool.chunks), GFP_KERNEL);
	if (!pool.chunks)
		return -ENOMEM;
	/* The first chunk up front: a module that cannot map any fails to load. */
	ret = rmem_pool_grow();
	if (ret) {
		kfree(pool.chunks);
		pool.chunks = NULL;
	}
	return ret;
}

void rmem_pool_exit(void)
{
	unsigned int i;

	/* Every device page holds a module reference, so none is in use here. */
	WARN_ON(pool.in_use);
	for (i = 0; i < pool.nchunks; i++) {
		struct rmem_chunk *chunk = pool.chunks[i];

		memunmap_pages(&chunk->pagemap);
		release_mem_region(chunk->pagemap.range.start, RMEM_CHUNK_BYTES);
		kvfree(chunk->stuck);
		kvfree(chunk->staged);
		kvfree(chunk->handles);
		kfree(chunk);
	}
	kfree(pool.chunks);
	pool.chunks = NULL;
	pool.nchunks = 0;
}

bool rmem_capable_admin(void)
{
	return capable(CAP_SYS_ADMIN);
}

u32 rmem_current_tgid(void)
{
	return task_tgid_nr(current);
}

/*
 * The Rust misc device leaves file_operations.owner unset, so an open
 * /dev/rmem would not pin the module: the driver pins it itself.
 */
bool rmem_module_get(void)
{
	return try_module_get(THIS_MODULE);
}

void rmem_module_put(void)
{
	module_put(THIS_MODULE);
}

/* ---- fault-back --------------------------------------------------------- */

struct rmem_fetch {
	struct completion done;
	int result;
};

void rmem_fetch_complete(struct rmem_fetch *f, int result)
{
	f->result = result;
	complete(&f->done);
}

/*
 * A batch of fetches: every request is queued before the first wait, so the
 * agent sees them together (it fetches them in one batch). Waits are
 * killable (other signals do not cut a fetch short, or periodic signals
 * would starve the task) and bounded by the module's fault timeout from
 * the first request queued.
 */
struct rmem_batch {
	struct rmem_fetch one, *f;
	u64 one_id, *ids;	/* per fetch; 0: none queued */
	unsigned long deadline, timeout;
	bool dying;		/* a fatal signal came: withdraw the rest */
};

static int rmem_batch_init(struct rmem_batch *b, unsigned long n)
{
	b->deadline = 0;
	b->timeout = 0;
	b->dying = false;
	if (n == 1) {
		b->f = &b->one;
		b->ids = &b->one_id;
	} else {
		b->f = kmalloc_array(n, sizeof(*b->f), GFP_KERNEL | __GFP_NOWARN);
		b->ids = kcalloc(n, sizeof(*b->ids), GFP_KERNEL | __GFP_NOWARN);
		if (!b->f || !b->ids) {
			kfree(b->f);
			kfree(b->ids);
			return -ENOMEM;
		}
	}
	b->ids[0] = 0;
	return 0;
}

static void rmem_batch_free(struct rmem_batch *b)
{
	if (b->f != &b->one) {
		kfree(b->f);
		kfree(b->ids);
	}
}

/*
 * Queues fetch i: the contents of `handle` go to `dpage`. Returns 0, or
 * -ENOMEM, or -ETIMEDOUT when the agent is known to be gone.
 */
static int rmem_batch_queue(struct rmem_batch *b, unsigned long i, u64 handle, u32 tgid,
			    unsigned long addr, struct page *dpage, bool fault)
{
	u64 id;

	init_completion(&b->f[i].done);
	b->f[i].result = -EIO;
	id = rmem_rs_fetch_queue(handle, tgid, addr, page_address(dpage), fault, &b->f[i],
				 &b->timeout);
	if (id == 0 || id == U64_MAX)
		return id ? -ETIMEDOUT : -ENOMEM;
	b->ids[i] = id;
	if (!b->deadline)
		b->deadline = jiffies + b->timeout;
	return 0;
}

/*
 * Waits for queued fetch i; its result. -EINTR: a fatal signal, after
 * which every later wait withdraws its request at once.
 */
static int rmem_batch_wait(struct rmem_batch *b, unsigned long i)
{
	long left = 0;

	if (!b->dying) {
		long wait = (long)(b->deadline - jiffies);

		left = wait_for_completion_killable_timeout(&b->f[i].done, max(wait, 1L));
	}
	if (left > 0)
		return b->f[i].result;
	if (rmem_rs_fetch_cancel(b->ids[i], left == 0 && !b->dying))
		return b->f[i].result;	/* answered meanwhile: it stands */
	if (left == 0 && !b->dying)
		return -ETIMEDOUT;
	b->dying = true;
	return -EINTR;
}

/*
 * Bring back the pages of args (set up with SELECT_DEVICE_PRIVATE). A page
 * a first try staged moves with its staged copy, without a fetch; the
 * others are fetched (with the caller's mmap_lock held) unless
 * `fetch_rest` is false, which leaves every page after page 0 that has no
 * staged copy remote (a retry does not wait again for neighbours its first
 * try could not get). A staged error is no use here (the fault path
 * handles its own page's before): it is dropped and the page fetched anew.
 *
 * Returns pages restored. When `only_first` (a fault with prefetch), the
 * error of page 0 alone goes to *first_err: a neighbour that fails just
 * stays remote. Otherwise the first error goes to *first_err. A fatal
 * signal (-EINTR) withdraws every request still waiting.
 */
static long rmem_fetch_and_migrate(struct migrate_vma *args, u32 tgid, bool fault,
				   bool only_first, bool fetch_rest, int *first_err)
{
	struct rmem_batch b;
	unsigned long i;
	long restored = 0;
	int err;

	if (rmem_batch_init(&b, args->npages)) {
		*first_err = -ENOMEM;
		for (i = 0; i < args->npages; i++)
			args->dst[i] = 0;
		migrate_vma_pages(args);
		migrate_vma_finalize(args);
		return 0;
	}
	/* Queue: a device page of ours gets a fresh system page and a request. */
	for (i = 0; i < args->npages; i++) {
		struct page *spage = migrate_pfn_to_page(args->src[i]);
		unsigned long addr = args->start + (i << PAGE_SHIFT);
		bool report = !*first_err && (!only_first || i == 0);
		struct page *dpage;

		args->dst[i] = 0;
		b.ids[i] = 0;
		if (!spage || !(args->src[i] & MIGRATE_PFN_MIGRATE))
			continue;
		if (page_pgmap(spage)->owner != &rmem_owner)
			continue;
		/* spage is locked (by setup, or the fault): its slot is ours. */
		dpage = take_staged(spage);
		if (!IS_ERR_OR_NULL(dpage)) {
			lock_page(dpage);
			args->dst[i] = migrate_pfn(page_to_pfn(dpage)) |
				       (args->src[i] & MIGRATE_PFN_WRITE);
			restored++;
			continue;
		}
		if (i > 0 && !fetch_rest)
			continue;
		dpage = alloc_page_vma(GFP_HIGHUSER_MOVABLE, args->vma, addr);
		if (!dpage) {
			if (report)
				*first_err = -ENOMEM;
			continue;
		}
		lock_page(dpage);
		err = rmem_batch_queue(&b, i, page_handle(spage), tgid, addr, dpage, fault);
		if (err) {
			if (report)
				*first_err = err;
			unlock_page(dpage);
			put_page(dpage);
			continue;
		}
		args->dst[i] = migrate_pfn(page_to_pfn(dpage));
	}
	/* Wait for each answer; a page without one stays remote. */
	for (i = 0; i < args->npages; i++) {
		struct page *dpage;

		if (!b.ids[i])
			continue;
		err = rmem_batch_wait(&b, i);
		dpage = migrate_pfn_to_page(args->dst[i]);
		if (err) {
			unlock_page(dpage);
			put_page(dpage);
			args->dst[i] = 0;
			if (!*first_err && (!only_first || i == 0 || err == -EINTR))
				*first_err = err;
			continue;
		}
		args->dst[i] |= args->src[i] & MIGRATE_PFN_WRITE;
		restored++;
	}
	migrate_vma_pages(args);
	/*
	 * A page that could not move after all (a reference someone took
	 * meanwhile, such as another migration's collect trying its lock)
	 * keeps its contents staged instead of losing them, so its next
	 * fault does not fetch it again. It is still locked and referenced
	 * by the migration, as set_staged wants.
	 */
	for (i = 0; i < args->npages; i++) {
		struct page *dpage = migrate_pfn_to_page(args->dst[i]);

		if (!dpage || (args->src[i] & MIGRATE_PFN_MIGRATE))
			continue;
		args->dst[i] = 0;
		restored--;
		unlock_page(dpage);
		set_staged(migrate_pfn_to_page(args->src[i]), dpage);
	}
	migrate_vma_finalize(args);
	rmem_batch_free(&b);
	return restored;
}

/* ---- prefetch: a sequential detector per address space ---------------- */

/* Most pages brought back ahead of a fault (the prefetch_max parameter). */
static unsigned int rmem_prefetch_max;
static atomic64_t rmem_prefetched;
/* Faults that dropped the mmap_lock while their pages were fetched. */
static atomic64_t rmem_retried;

/*
 * The last faults of a few address spaces: where the next fault of a
 * sequential scan lands (the page after what the last fault brought back),
 * the window it used and where that fault was. A scan's windows double
 * from 2 up to prefetch_max; any other fault resets its window to 0, but
 * the same fault again (the retry of a first try that dropped the
 * mmap_lock, or the fault again after a signal) gets the same window and
 * leaves the slot as it is: it moves the pages its first try staged. A slot
 * shared by two address spaces only costs a window; a stale mm pointer is
 * compared, never followed. Each slot has its own lock and cache line, so
 * faults of different address spaces on many CPUs do not contend here.
 */
#define RMEM_RA_SLOTS 64
static struct rmem_ra {
	spinlock_t lock;
	const struct mm_struct *mm;
	unsigned long last, next;
	unsigned int window;
} ____cacheline_aligned_in_smp rmem_ra[RMEM_RA_SLOTS] = {
	[0 ... RMEM_RA_SLOTS - 1] = { .lock = __SPIN_LOCK_UNLOCKED(rmem_ra.lock) },
};

/* Pages to bring back after the one faulting at `addr`. */
static unsigned int rmem_ra_window(const struct mm_struct *mm, unsigned long addr,
				   unsigned long vma_end)
{
	struct rmem_ra *ra = &rmem_ra[hash_ptr((void *)mm, ilog2(RMEM_RA_SLOTS))];
	unsigned int cap = READ_ONCE(rmem_prefetch_max), window = 0;
	unsigned long room = (vma_end - addr - PAGE_SIZE) >> PAGE_SHIFT;

	if (!cap)
		return 0;
	spin_lock(&ra->lock);
	if (ra->mm == mm && ra->last == addr) {
		window = min_t(unsigned long, ra->window, room);
		spin_unlock(&ra->lock);
		return window;
	}
	if (ra->mm == mm && ra->next == addr)
		window = min(max(ra->window * 2, 2U), cap);
	window = min_t(unsigned long, window, room);
	ra->mm = mm;
	ra->last = addr;
	ra->window = window;
	ra->next = addr + ((unsigned long)window + 1) * PAGE_SIZE;
	spin_unlock(&ra->lock);
	return window;
}

void rmem_set_prefetch_max(u32 pages)
{
	WRITE_ONCE(rmem_prefetch_max, min_t(u32, pages, RMEM_PREFETCH_LIMIT));
}

u64 rmem_prefetched_pages(void)
{
	return atomic64_read(&rmem_prefetched);
}

u64 rmem_retried_faults(void)
{
	return atomic64_read(&rmem_retried);
}

/* Faults that ended because their page could not move back in time. */
static atomic64_t rmem_stuck;

u64 rmem_stuck_faults(void)
{
	return atomic64_read(&rmem_stuck);
}

/*
 * Testing only: every fault-back takes an extra reference on its device
 * page, so the kernel's own check (migrate_vma_check_page) refuses to move
 * it and the stuck path below runs as it would for a real refusal. Off by
 * default; only root may flip it at run time (the VM suite does). A C
 * parameter: the Rust module! parameters are read-only.
 */
static bool rmem_inject_stuck;
module_param_named(inject_stuck_faults, rmem_inject_stuck, bool, 0600);
MODULE_PARM_DESC(inject_stuck_faults,
		 "Testing only: the kernel refuses every fault-back (an extra page reference)");

static vm_fault_t rmem_fault_error(struct vm_fault *vmf, int err);

/*
 * The fault on vmf->page could not move it back although nothing failed:
 * the kernel refused the migration (a reference or a mapping it cannot
 * handle). Returning at once would spin: the CPU faults again at once,
 * forever, at 100% CPU. The first such fault of an episode notes when;
 * each one after it waits a tick, and once the fault timeout has passed
 * since the first the fault fails (SIGBUS, counted, logged). An attempt
 * more than a second after the previous one starts a new episode (the
 * last one ended without the page moving: the task was killed, the range
 * unmapped). The wait follows the kernel's convention for faults that
 * must wait (__folio_lock_or_retry): with ALLOW_RETRY it drops the
 * mmap_lock first and returns VM_FAULT_RETRY; with RETRY_NOWAIT it does
 * not wait at all; a task with a fatal signal does not wait either.
 */
static vm_fault_t rmem_fault_stuck(struct vm_fault *vmf)
{
	unsigned long timeout = max(rmem_rs_fault_timeout(), 1UL), now = jiffies, flags;
	struct page *page = vmf->page;
	struct rmem_stuck *st;
	bool expired;

	if (fatal_signal_pending(current))
		return rmem_fault_error(vmf, -EINTR);
	spin_lock_irqsave(&pool.lock, flags);
	st = &page_chunk(page)->stuck[page_index_in_chunk(page)];
	if (!st->since || time_after(now, st->last + HZ))
		st->since = now ? now : 1;
	st->last = now;
	expired = time_after(now, st->since + timeout);
	spin_unlock_irqrestore(&pool.lock, flags);
	if (expired) {
		atomic64_inc(&rmem_stuck);
		return rmem_fault_error(vmf, -ETIME);
	}
	if (vmf->flags & FAULT_FLAG_RETRY_NOWAIT)
		return VM_FAULT_RETRY;
	if (vmf->flags & FAULT_FLAG_ALLOW_RETRY) {
		release_fault_lock(vmf);
		schedule_timeout_killable(1);
		return VM_FAULT_RETRY;
	}
	schedule_timeout_killable(1);
	return 0;
}

/* What a fault that could not bring its page back returns. */
static vm_fault_t rmem_fault_error(struct vm_fault *vmf, int err)
{
	if (err == -EFAULT)
		return VM_FAULT_SIGBUS;
	if (err == -ETIME) {
		pr_err_ratelimited("rmem: fault at %#lx in pid %d: the kernel did not let the page move back within the fault timeout, sending SIGBUS\n",
				   vmf->address, task_tgid_nr(current));
		return VM_FAULT_SIGBUS;
	}
	if (err == -EINTR)	/* a fatal signal: the task dies on its way out */
		return (vmf->flags & FAULT_FLAG_USER) ? 0 : VM_FAULT_SIGBUS;
	if (err == -ENOMEM)
		return VM_FAULT_OOM;
	pr_err_ratelimited("rmem: fault at %#lx in pid %d: remote page unavailable (%d), sending SIGBUS\n",
			   vmf->address, task_tgid_nr(current), err);
	return VM_FAULT_SIGBUS;
}

/* A device page a first try fetches: its fresh system page and address. */
struct rmem_staging {
	struct page *page, *dpage;
	unsigned long addr;
};

/*
 * The window's neighbours of a first try (pages 1..window after `addr`),
 * into st[1..]; returns how many. They are found by a migration over them
 * that is abandoned at once (no destinations: finalize puts their entries
 * back), which is what takes them safely under the mmap_lock; each gets a
 * reference before that and is locked again with trylock after. One taken
 * meanwhile, or already staged, is left out.
 */
static unsigned long rmem_stage_neighbours(struct vm_fault *vmf, unsigned long addr,
					   unsigned int window, struct rmem_staging *st)
{
	struct migrate_vma args = {
		.vma = vmf->vma,
		.start = addr + PAGE_SIZE,
		.end = addr + ((unsigned long)window + 1) * PAGE_SIZE,
		.pgmap_owner = &rmem_owner,
		.flags = MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
	};
	unsigned long i, n = 1, k;

	args.src = kcalloc(window, sizeof(*args.src), GFP_KERNEL | __GFP_NOWARN);
	args.dst = kcalloc(window, sizeof(*args.dst), GFP_KERNEL | __GFP_NOWARN);
	if (!args.src || !args.dst || migrate_vma_setup(&args))
		goto out;
	for (i = 0; i < args.npages; i++) {
		struct page *page = migrate_pfn_to_page(args.src[i]);

		if (!page || !(args.src[i] & MIGRATE_PFN_MIGRATE) ||
		    page_pgmap(page)->owner != &rmem_owner)
			continue;
		get_page(page);
		st[n].page = page;
		st[n].addr = args.start + (i << PAGE_SHIFT);
		n++;
	}
	migrate_vma_finalize(&args);	/* no destinations: everything goes back */
	for (i = 1, k = 1; i < n; i++) {
		struct page *page = st[i].page;

		if (!trylock_page(page)) {
			put_page(page);
			continue;
		}
		if (!IS_ERR_OR_NULL(page_staged(page))) {
			unlock_page(page);
			put_page(page);
			continue;
		}
		st[k++] = st[i];
	}
	n = k;
out:
	kfree(args.src);
	kfree(args.dst);
	return n - 1;
}

/*
 * The first try of a fault (see the top of the file): fetch the faulting
 * page and its window's neighbours with the mmap_lock dropped and stage
 * them; the retry migrates them without waiting. Called with vmf->page
 * locked and referenced by do_swap_page and nothing staged for it.
 *
 * Returns VM_FAULT_RETRY with the mmap_lock released (after which vmf->vma
 * is not touched: it may be gone), or, when not even the faulting page's
 * request could be queued, the fault's error with the lock still held.
 * When the faulting page's fetch fails its error is staged, so the retry
 * ends the same way without a second wait; a fatal signal stages nothing
 * (the arch code sees it and does not retry).
 */
static vm_fault_t rmem_stage(struct vm_fault *vmf, unsigned long addr, unsigned int window)
{
	struct rmem_staging one, *st = &one;
	u32 tgid = task_tgid_nr(current);
	struct rmem_batch b;
	unsigned long i, n;
	int err;

	if (window) {
		st = kcalloc(window + 1, sizeof(*st), GFP_KERNEL | __GFP_NOWARN);
		if (!st) {
			st = &one;
			window = 0;
		}
	}
	st[0].page = vmf->page;
	st[0].addr = addr;
	n = 1 + (window ? rmem_stage_neighbours(vmf, addr, window, st) : 0);
	if (rmem_batch_init(&b, n)) {
		err = -ENOMEM;
		goto fail;
	}
	/* The faulting page first: without its request there is no point. */
	for (i = 0; i < n; i++) {
		st[i].dpage = alloc_page_vma(GFP_HIGHUSER_MOVABLE, vmf->vma, st[i].addr);
		err = st[i].dpage ? 0 : -ENOMEM;
		if (!err)
			err = rmem_batch_queue(&b, i, page_handle(st[i].page), tgid, st[i].addr,
					       st[i].dpage, true);
		if (err && st[i].dpage) {
			put_page(st[i].dpage);
			st[i].dpage = NULL;
		}
		if (err && i == 0) {
			rmem_batch_free(&b);
			goto fail;
		}
	}
	release_fault_lock(vmf);
	atomic64_inc(&rmem_retried);
	for (i = 0; i < n; i++) {
		if (!b.ids[i])
			continue;
		err = rmem_batch_wait(&b, i);
		if (!err)
			set_staged(st[i].page, st[i].dpage);
		else
			put_page(st[i].dpage);
		if (err && err != -EINTR && i == 0)
			set_staged(st[i].page, ERR_PTR(err));
	}
	rmem_batch_free(&b);
	/* The neighbours' locks and references; do_swap_page drops page 0's. */
	for (i = 1; i < n; i++) {
		unlock_page(st[i].page);
		put_page(st[i].page);
	}
	if (st != &one)
		kfree(st);
	return VM_FAULT_RETRY;

fail:
	for (i = 1; i < n; i++) {
		unlock_page(st[i].page);
		put_page(st[i].page);
	}
	if (st != &one)
		kfree(st);
	return rmem_fault_error(vmf, err);
}

static vm_fault_t rmem_migrate_to_ram(struct vm_fault *vmf)
{
	unsigned long addr = ALIGN_DOWN(vmf->address, PAGE_SIZE);
	unsigned long one_src = 0, one_dst = 0, *src = &one_src, *dst = &one_dst;
	struct page *staged = page_staged(vmf->page);
	struct migrate_vma args = {
		.vma = vmf->vma,
		.start = addr,
		.pgmap_owner = &rmem_owner,
		.flags = MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
		.fault_page = vmf->page,
	};
	bool inject = READ_ONCE(rmem_inject_stuck), moved = false;
	unsigned int window;
	long restored;
	int err = 0;

	/* Its first try's fetch failed: the same outcome, without a second wait. */
	if (IS_ERR(staged)) {
		take_staged(vmf->page);
		return rmem_fault_error(vmf, PTR_ERR(staged));
	}
	window = rmem_ra_window(vmf->vma->vm_mm, addr, vmf->vma->vm_end);
	if (!staged && fault_flag_allow_retry_first(vmf->flags) &&
	    !(vmf->flags & FAULT_FLAG_RETRY_NOWAIT))
		return rmem_stage(vmf, addr, window);
	if (window) {
		src = kcalloc(window + 1, sizeof(*src), GFP_KERNEL | __GFP_NOWARN);
		dst = kcalloc(window + 1, sizeof(*dst), GFP_KERNEL | __GFP_NOWARN);
		if (!src || !dst) {
			kfree(src);
			kfree(dst);
			src = &one_src;
			dst = &one_dst;
			window = 0;
		}
	}
	args.end = addr + ((unsigned long)window + 1) * PAGE_SIZE;
	args.src = src;
	args.dst = dst;
	if (inject)
		get_page(vmf->page);
	if (migrate_vma_setup(&args)) {
		err = -EFAULT;
		goto out;
	}
	/*
	 * Called with vmf->page locked: nobody else migrates it meanwhile. Its
	 * neighbours are taken only if their locks were free, and only device
	 * pages of ours are selected, so page 0 is the faulting one. When it
	 * was staged, neighbours its first try could not stage stay remote.
	 */
	restored = rmem_fetch_and_migrate(&args, task_tgid_nr(current), true, true, !staged,
					  &err);
	if (restored > 1)
		atomic64_add(restored - 1, &rmem_prefetched);
	moved = migrate_pfn_to_page(args.dst[0]) && (args.src[0] & MIGRATE_PFN_MIGRATE);
out:
	if (inject)
		put_page(vmf->page);
	if (src != &one_src) {
		kfree(src);
		kfree(dst);
	}
	if (err)
		return rmem_fault_error(vmf, err);
	/* Page 0 did not move and nothing failed: never spin on it. */
	return moved ? 0 : rmem_fault_stuck(vmf);
}

/* ---- attachments ------------------------------------------------------- */

struct rmem_att {
	struct mmu_interval_notifier notifier;
	s32 pid;
	bool all;
	u64 start, end;
};

/*
 * The notifier holds the mm_struct for the attachment; the module keeps no
 * mirror of the page tables to update, so nothing reads a sequence number
 * (no mmu_interval_read_begin/retry, hence no mmu_interval_set_seq and no
 * update lock): unmap, exit and fork reach the module through folio_free,
 * and a commit compares page contents, which catches the writes no
 * notifier reports.
 */
static bool rmem_invalidate(struct mmu_interval_notifier *mni,
			    const struct mmu_notifier_range *range,
			    unsigned long cur_seq)
{
	return true;
}

static const struct mmu_interval_notifier_ops rmem_notifier_ops = {
	.invalidate = rmem_invalidate,
};

struct rmem_att *rmem_att_new(s32 pid, u64 start, u64 len, bool all, int *err)
{
	struct task_struct *task;
	struct mm_struct *mm;
	struct rmem_att *a;
	struct pid *p;
	int ret;

	if (all) {
		start = 0;
		len = TASK_SIZE;
	}
	if (!len || !PAGE_ALIGNED(start) || !PAGE_ALIGNED(len) ||
	    start + len < start || start + len > TASK_SIZE) {
		*err = -EINVAL;
		return NULL;
	}
	p = find_get_pid(pid);
	task = p ? get_pid_task(p, PIDTYPE_TGID) : NULL;
	put_pid(p);
	if (!task) {
		*err = -ESRCH;
		return NULL;
	}
	mm = get_task_mm(task);
	put_task_struct(task);
	if (!mm) {
		*err = -ESRCH;
		return NULL;
	}
	/*
	 * The agent's own memory (or memory it shares through CLONE_VM) would
	 * deadlock its copies: never attach it.
	 */
	if (mm == current->mm) {
		mmput(mm);
		*err = -EINVAL;
		return NULL;
	}
	a = kzalloc_obj(*a);
	if (!a) {
		mmput(mm);
		*err = -ENOMEM;
		return NULL;
	}
	a->pid = pid;
	a->all = all;
	a->start = start;
	a->end = start + len;
	/* The notifier keeps the mm_struct (not the address space) alive. */
	ret = mmu_interval_notifier_insert(&a->notifier, mm, start, len, &rmem_notifier_ops);
	mmput(mm);
	if (ret) {
		kfree(a);
		*err = ret;
		return NULL;
	}
	return a;
}

long rmem_att_restore(struct rmem_att *a)
{
	struct mm_struct *mm = a->notifier.mm;
	unsigned long src[RMEM_RESTORE_STEP], dst[RMEM_RESTORE_STEP];
	unsigned long addr;
	long restored = 0;
	int err = 0;

	if (!mmget_not_zero(mm))
		return 0;	/* the address space is gone, and its pages with it */
	/*
	 * The mmap_lock is taken per step, so the target's own mmap/munmap
	 * callers (and the faults queued behind them) are not held up for the
	 * whole detach.
	 */
	for (addr = a->start; addr < a->end && !err;) {
		struct migrate_vma args = {};
		struct vm_area_struct *vma;

		mmap_read_lock(mm);
		vma = find_vma(mm, addr);
		if (!vma || vma->vm_start >= a->end) {
			mmap_read_unlock(mm);
			break;
		}
		addr = max_t(unsigned long, addr, vma->vm_start);
		args.vma = vma;
		args.start = addr;
		args.end = min3(vma->vm_end, (unsigned long)a->end,
				addr + RMEM_RESTORE_STEP * PAGE_SIZE);
		args.src = src;
		args.dst = dst;
		args.pgmap_owner = &rmem_owner;
		args.flags = MIGRATE_VMA_SELECT_DEVICE_PRIVATE;
		addr = args.end;
		if (vma_is_anonymous(vma) && !migrate_vma_setup(&args))
			restored += rmem_fetch_and_migrate(&args, a->pid, false, false, true,
							   &err);
		mmap_read_unlock(mm);
		if (fatal_signal_pending(current) && !err)
			err = -EINTR;
		cond_resched();
	}
	mmput(mm);
	return err ? err : restored;
}

void rmem_att_free(struct rmem_att *a)
{
	mmu_interval_notifier_remove(&a->notifier);
	kfree(a);
}

void rmem_att_describe(const struct rmem_att *a, s32 *pid, u64 *start, u64 *len,
		       bool *all, bool *exited)
{
	*pid = a->pid;
	*all = a->all;
	*start = a->all ? 0 : a->start;
	*len = a->all ? 0 : a->end - a->start;
	/* The notifier holds the mm_struct; its users are gone once it exited. */
	*exited = atomic_read(&a->notifier.mm->mm_users) == 0;
}

/* ---- eviction ---------------------------------------------------------- */

/*
 * Eviction is two calls with nothing pending in between, so no migration
 * state outlives the mmap_lock (the source pages' anon_vma is only safe
 * while it is held):
 *  - rmem_evict_copy: migrate_vma_setup on system pages, copy the (now
 *    stable) pages out to the agent, and put them straight back;
 *  - rmem_evict_commit, after the server acknowledged the copies: set up
 *    again and move only the pages whose contents still equal the
 *    acknowledged copy to device pages carrying their handles. A page
 *    written, unmapped or replaced in between stays in RAM, and the agent
 *    frees its copy.
 */

/*
 * What eviction takes, and what it leaves in RAM (docs/ARCHITECTURE.md has
 * the table). Per mapping:
 *  - private anonymous memory is evicted, including VM_DONTCOPY and
 *    VM_WIPEONFORK (fork handles device-private entries like swap entries)
 *    and transparent huge pages (migrate_vma splits them);
 *  - mergeable mappings (VM_MERGEABLE: MADV_MERGEABLE, PR_SET_MEMORY_MERGE)
 *    stay, merged pages or not: they are KSM's to deduplicate, and a page
 *    moved out is one ksmd can no longer merge (the program's KSM
 *    behaviour, its ksm_merging_pages and the kernel's KSM tests, would
 *    change with rmem's timing). After MADV_UNMERGEABLE they move;
 *  - mlocked mappings (VM_LOCKED, also MCL_ONFAULT) stay: the program
 *    asked for them to stay in RAM, and the kernel never swaps them either;
 *  - userfaultfd-registered ranges stay: their faults (missing, minor,
 *    write-protect) belong to another handler, which expects its pages in
 *    RAM and its own protocol, not a device's;
 *  - anything not private anonymous stays: shared anonymous memory (shmem),
 *    files, hugetlb, memfd_secret (not in the direct map), and VM_SPECIAL
 *    ranges (VM_IO, VM_PFNMAP, VM_MIXEDMAP, VM_DONTEXPAND).
 * Per page:
 *  - a KSM page stays, wherever it is mapped: migrating it would move
 *    KSM's stable-tree node to a device-private page that every sharer
 *    (and ksmd's memcmp) then touches;
 *  - a pinned page (O_DIRECT, RDMA, vfio) stays: migrate_vma's reference
 *    check refuses it, and so does the zero page (no contents to keep).
 * Skipped pages are counted by reason (RMEM_IOC_INFO).
 */
static atomic64_t rmem_skipped[RMEM_SKIP_KINDS];

u64 rmem_skipped_pages(u32 why)
{
	return why < RMEM_SKIP_KINDS ? atomic64_read(&rmem_skipped[why]) : 0;
}

/* Why eviction leaves all of `vma` in RAM, or -1 when it may take it. */
static int vma_skip(struct vm_area_struct *vma)
{
	if (!vma_is_anonymous(vma) ||
	    (vma->vm_flags & (VM_SHARED | VM_SPECIAL | VM_HUGETLB)) ||
	    userfaultfd_armed(vma))
		return RMEM_SKIP_MAPPING;
	if (vma->vm_flags & VM_LOCKED)
		return RMEM_SKIP_LOCKED;
	if (vma->vm_flags & VM_MERGEABLE)
		return RMEM_SKIP_KSM;
	return -1;
}

/*
 * Sets up a migration of system pages of [start, start + max pages) within
 * one mapping. -EFAULT: nothing mapped at start; -EACCES: a mapping that
 * eviction never takes (its pages are counted as skipped).
 */
static int evict_setup(struct mm_struct *mm, struct migrate_vma *args,
		       u64 start, u32 max, const struct rmem_att *a)
{
	struct vm_area_struct *vma;
	int skip;

	vma = vma_lookup(mm, start);
	if (!vma)
		return -EFAULT;
	args->vma = vma;
	args->start = start;
	args->end = min3((unsigned long)start + ((unsigned long)max << PAGE_SHIFT),
			 vma->vm_end, (unsigned long)a->end);
	skip = vma_skip(vma);
	if (skip >= 0) {
		atomic64_add((args->end - args->start) >> PAGE_SHIFT, &rmem_skipped[skip]);
		return -EACCES;
	}
	args->pgmap_owner = &rmem_owner;
	args->flags = MIGRATE_VMA_SELECT_SYSTEM;
	return migrate_vma_setup(args);
}

/*
 * Whether page i of a set-up eviction is ours to move: selected by the
 * migration (locked and unmapped) and not a KSM page. A page ksmd merges
 * between copy and commit is a KSM page at the commit, whose setup holds
 * its lock, so ksmd cannot merge it under the check.
 */
static bool taken(const struct migrate_vma *args, unsigned long i, bool count)
{
	struct page *page = migrate_pfn_to_page(args->src[i]);

	if (!page || !(args->src[i] & MIGRATE_PFN_MIGRATE))
		return false;
	if (folio_test_ksm(page_folio(page))) {
		if (count)
			atomic64_inc(&rmem_skipped[RMEM_SKIP_KSM]);
		return false;
	}
	return true;
}

static int evict_check(const struct rmem_att *a, u64 start, u32 max)
{
	if (!max || max > RMEM_MAX_BATCH || !PAGE_ALIGNED(start) ||
	    start < a->start || start >= a->end)
		return -EINVAL;
	return 0;
}

long rmem_evict_copy(struct rmem_att *a, u64 start, u32 max, u64 data, u64 addrs)
{
	struct mm_struct *mm = a->notifier.mm;
	struct migrate_vma args = {};
	unsigned long i;
	long n = 0;
	int ret;

	ret = evict_check(a, start, max);
	if (ret)
		return ret;
	args.src = kvcalloc(max, sizeof(unsigned long), GFP_KERNEL);
	args.dst = kvcalloc(max, sizeof(unsigned long), GFP_KERNEL);
	if (!args.src || !args.dst) {
		n = -ENOMEM;
		goto free;
	}
	if (!mmget_not_zero(mm)) {
		n = -ESRCH;
		goto free;
	}
	mmap_read_lock(mm);
	ret = evict_setup(mm, &args, start, max, a);
	if (ret) {
		n = ret;
		goto unlock;
	}
	/*
	 * The taken pages are locked and unmapped: copy a consistent snapshot.
	 * The agent's buffer is in another mm (it never attaches itself), so
	 * faulting it in takes no lock we hold.
	 */
	for (i = 0; i < args.npages; i++) {
		u64 addr = args.start + (i << PAGE_SHIFT);

		if (!taken(&args, i, true))
			continue;
		if (copy_to_user(u64_to_user_ptr(data + (u64)n * PAGE_SIZE),
				 page_address(migrate_pfn_to_page(args.src[i])), PAGE_SIZE) ||
		    copy_to_user(u64_to_user_ptr(addrs + (u64)n * sizeof(u64)), &addr, sizeof(addr))) {
			n = -EFAULT;
			break;
		}
		n++;
	}
	migrate_vma_finalize(&args);	/* no destinations: everything goes back */
unlock:
	mmap_read_unlock(mm);
	mmput(mm);
free:
	kvfree(args.src);
	kvfree(args.dst);
	return n;
}

long rmem_evict_commit(struct rmem_att *a, u64 start, u32 max, u32 n,
		       const u64 *addrs, const u64 *handles, const u8 *data, u8 *status)
{
	struct mm_struct *mm = a->notifier.mm;
	struct migrate_vma args = {};
	struct page **dpages;
	u32 *slot;
	unsigned long i;
	long moved = 0;
	u32 k;
	int ret;

	ret = evict_check(a, start, max);
	if (ret)
		return ret;
	memset(status, 0, n);
	args.src = kvcalloc(max, sizeof(unsigned long), GFP_KERNEL);
	args.dst = kvcalloc(max, sizeof(unsigned long), GFP_KERNEL);
	slot = kvcalloc(max, sizeof(u32), GFP_KERNEL);
	dpages = kvcalloc(n, sizeof(*dpages), GFP_KERNEL);
	if (!args.src || !args.dst || !slot || !dpages) {
		moved = -ENOMEM;
		goto free;
	}
	/*
	 * Device pages first, before any source page is locked: growing the
	 * pool takes the memory-hotplug lock.
	 */
	for (k = 0; k < n; k++)
		if (handles[k] != RMEM_NO_HANDLE)
			dpages[k] = rmem_pool_alloc(handles[k]);
	if (!mmget_not_zero(mm)) {
		moved = -ESRCH;
		goto put;
	}
	mmap_read_lock(mm);
	ret = evict_setup(mm, &args, start, max, a);
	if (ret) {
		moved = ret;
		goto unlock;
	}
	for (i = 0, k = 0; i < args.npages; i++) {
		u64 addr = args.start + (i << PAGE_SHIFT);
		struct page *spage = migrate_pfn_to_page(args.src[i]);

		slot[i] = U32_MAX;
		while (k < n && addrs[k] < addr)
			k++;
		if (k == n || addrs[k] != addr || !taken(&args, i, false) || !dpages[k])
			continue;
		/* Only what the server holds may leave RAM. */
		if (memcmp(page_address(spage), data + (size_t)k * PAGE_SIZE, PAGE_SIZE))
			continue;
		slot[i] = k;
		args.dst[i] = migrate_pfn(page_to_pfn(dpages[k])) |
			      (args.src[i] & MIGRATE_PFN_WRITE);
		dpages[k] = NULL;	/* finalize owns it now */
	}
	migrate_vma_pages(&args);
	for (i = 0; i < args.npages; i++) {
		struct page *dpage = migrate_pfn_to_page(args.dst[i]);

		if (!dpage)
			continue;
		if (args.src[i] & MIGRATE_PFN_MIGRATE) {
			status[slot[i]] = 1;
			moved++;
		} else {
			/* Not migrated after all: finalize frees it, unreported. */
			set_page_handle(dpage, RMEM_NO_HANDLE);
		}
	}
	migrate_vma_finalize(&args);
unlock:
	mmap_read_unlock(mm);
	mmput(mm);
put:
	for (k = 0; k < n; k++) {
		if (!dpages[k])
			continue;
		set_page_handle(dpages[k], RMEM_NO_HANDLE);
		unlock_page(dpages[k]);
		put_page(dpages[k]);
	}
free:
	kvfree(dpages);
	kvfree(slot);
	kvfree(args.src);
	kvfree(args.dst);
	return moved;
}
