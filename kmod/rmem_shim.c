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
 * are allocated before its setup).
 * A fetch (rmem_fetch) sleeps with the target's mmap_lock held for read and
 * the device page locked, never with a lock of ours held; the agent's reply
 * takes only the driver's request-queue mutex.
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

#include "rmem_shim.h"

#define RMEM_CHUNK_BYTES (64UL << 20)
#define RMEM_CHUNK_PAGES (RMEM_CHUNK_BYTES >> PAGE_SHIFT)
#define RMEM_NO_HANDLE (~0ULL)
#define RMEM_RESTORE_STEP 64UL
#define RMEM_MAX_BATCH 512

/* The pages' contents are reached through page_address(): no highmem. */
static_assert(!IS_ENABLED(CONFIG_HIGHMEM));

struct rmem_chunk {
	struct dev_pagemap pagemap;
	struct resource *res;
	u64 *handles;		/* per page; RMEM_NO_HANDLE when free */
};

static struct {
	struct mutex grow_lock;	/* chunks, nchunks */
	spinlock_t lock;	/* free, freed, the counters, chunk handles */
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

/* Called when the last reference to a device page goes; may be atomic. */
static void rmem_folio_free(struct folio *folio)
{
	struct page *page = &folio->page;
	unsigned long flags;
	bool report;

	spin_lock_irqsave(&pool.lock, flags);
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

/*
 * Bring back the pages of args (set up with SELECT_DEVICE_PRIVATE) whose
 * contents the agent delivers. Returns pages restored, or the first error
 * when none could be; pages that fail stay remote.
 */
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
 * Bring back the pages of args (set up with SELECT_DEVICE_PRIVATE) whose
 * contents the agent delivers. Every request is queued before the first
 * wait, so the agent sees them together (it fetches them in one batch).
 * Waits are killable (other signals do not cut a fetch short, or periodic
 * signals would starve the task) and bounded by the module's fault timeout.
 *
 * Returns pages restored. When `only_first` (a fault with prefetch), the
 * error of page 0 alone goes to *first_err: a neighbour that fails just
 * stays remote. Otherwise the first error goes to *first_err. A fatal
 * signal (-EINTR) withdraws every request still waiting.
 */
static long rmem_fetch_and_migrate(struct migrate_vma *args, u32 tgid, bool fault,
				   bool only_first, int *first_err)
{
	struct rmem_fetch one, *f;
	u64 one_id, *ids;
	unsigned long i, deadline = 0, timeout = 0;
	long restored = 0;
	bool dying = false;

	if (args->npages == 1) {
		f = &one;
		ids = &one_id;
	} else {
		f = kmalloc_array(args->npages, sizeof(*f), GFP_KERNEL | __GFP_NOWARN);
		ids = kmalloc_array(args->npages, sizeof(*ids), GFP_KERNEL | __GFP_NOWARN);
		if (!f || !ids) {
			kfree(f);
			kfree(ids);
			*first_err = -ENOMEM;
			for (i = 0; i < args->npages; i++)
				args->dst[i] = 0;
			migrate_vma_pages(args);
			migrate_vma_finalize(args);
			return 0;
		}
	}
	/* Queue: a device page of ours gets a fresh system page and a request. */
	for (i = 0; i < args->npages; i++) {
		struct page *spage = migrate_pfn_to_page(args->src[i]);
		unsigned long addr = args->start + (i << PAGE_SHIFT);
		struct page *dpage;

		args->dst[i] = 0;
		ids[i] = 0;
		if (!spage || !(args->src[i] & MIGRATE_PFN_MIGRATE))
			continue;
		if (page_pgmap(spage)->owner != &rmem_owner)
			continue;
		dpage = alloc_page_vma(GFP_HIGHUSER_MOVABLE, args->vma, addr);
		if (!dpage) {
			if (!*first_err && (!only_first || i == 0))
				*first_err = -ENOMEM;
			continue;
		}
		lock_page(dpage);
		init_completion(&f[i].done);
		f[i].result = -EIO;
		ids[i] = rmem_rs_fetch_queue(page_handle(spage), tgid, addr, page_address(dpage),
					     fault, &f[i], &timeout);
		if (ids[i] == 0 || ids[i] == U64_MAX) {
			if (!*first_err && (!only_first || i == 0))
				*first_err = ids[i] ? -ETIMEDOUT : -ENOMEM;
			ids[i] = 0;
			unlock_page(dpage);
			put_page(dpage);
			continue;
		}
		if (!deadline)
			deadline = jiffies + timeout;
		args->dst[i] = migrate_pfn(page_to_pfn(dpage));
	}
	/* Wait for each answer; a page without one stays remote. */
	for (i = 0; i < args->npages; i++) {
		struct page *dpage;
		long left = 0;
		int err;

		if (!ids[i])
			continue;
		if (!dying) {
			long wait = (long)(deadline - jiffies);

			left = wait_for_completion_killable_timeout(&f[i].done, max(wait, 1L));
		}
		if (left > 0) {
			err = f[i].result;
		} else if (rmem_rs_fetch_cancel(ids[i], left == 0 && !dying)) {
			err = f[i].result;	/* answered meanwhile: it stands */
		} else {
			err = (left == 0 && !dying) ? -ETIMEDOUT : -EINTR;
			if (err == -EINTR)
				dying = true;
		}
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
	migrate_vma_finalize(args);
	if (f != &one) {
		kfree(f);
		kfree(ids);
	}
	return restored;
}

/* ---- prefetch: a sequential detector per address space ---------------- */

/* Most pages brought back ahead of a fault (the prefetch_max parameter). */
static unsigned int rmem_prefetch_max;
static atomic64_t rmem_prefetched;

/*
 * The last faults of a few address spaces: where the next fault of a
 * sequential scan lands (the page after what the last fault brought back)
 * and the window it used. A scan's windows double from 2 up to
 * prefetch_max; any other fault resets its window to 0. A slot shared by
 * two address spaces only costs a window; a stale mm pointer is compared,
 * never followed.
 */
#define RMEM_RA_SLOTS 64
static struct rmem_ra {
	const struct mm_struct *mm;
	unsigned long next;
	unsigned int window;
} rmem_ra[RMEM_RA_SLOTS];
static DEFINE_SPINLOCK(rmem_ra_lock);

/* Pages to bring back after the one faulting at `addr`. */
static unsigned int rmem_ra_window(const struct mm_struct *mm, unsigned long addr,
				   unsigned long vma_end)
{
	struct rmem_ra *ra = &rmem_ra[hash_ptr((void *)mm, ilog2(RMEM_RA_SLOTS))];
	unsigned int cap = READ_ONCE(rmem_prefetch_max), window = 0;

	if (!cap)
		return 0;
	spin_lock(&rmem_ra_lock);
	if (ra->mm == mm && ra->next == addr)
		window = min(max(ra->window * 2, 2U), cap);
	window = min_t(unsigned long, window, (vma_end - addr - PAGE_SIZE) >> PAGE_SHIFT);
	ra->mm = mm;
	ra->window = window;
	ra->next = addr + ((unsigned long)window + 1) * PAGE_SIZE;
	spin_unlock(&rmem_ra_lock);
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

static vm_fault_t rmem_migrate_to_ram(struct vm_fault *vmf)
{
	unsigned long addr = ALIGN_DOWN(vmf->address, PAGE_SIZE);
	unsigned long one_src = 0, one_dst = 0, *src = &one_src, *dst = &one_dst;
	unsigned int window = rmem_ra_window(vmf->vma->vm_mm, addr, vmf->vma->vm_end);
	struct migrate_vma args = {
		.vma = vmf->vma,
		.start = addr,
		.pgmap_owner = &rmem_owner,
		.flags = MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
		.fault_page = vmf->page,
	};
	long restored;
	int err = 0;

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
	if (migrate_vma_setup(&args)) {
		err = -EFAULT;
		goto out;
	}
	/*
	 * Called with vmf->page locked: nobody else migrates it meanwhile. Its
	 * neighbours are taken only if their locks were free, and only device
	 * pages of ours are selected, so page 0 is the faulting one.
	 */
	restored = rmem_fetch_and_migrate(&args, task_tgid_nr(current), true, true, &err);
	if (restored > 1)
		atomic64_add(restored - 1, &rmem_prefetched);
out:
	if (src != &one_src) {
		kfree(src);
		kfree(dst);
	}
	if (err == -EFAULT)
		return VM_FAULT_SIGBUS;
	if (err == -EINTR)	/* a fatal signal: the task dies on its way out */
		return (vmf->flags & FAULT_FLAG_USER) ? 0 : VM_FAULT_SIGBUS;
	if (err == -ENOMEM)
		return VM_FAULT_OOM;
	if (err) {
		pr_err_ratelimited("rmem: fault at %#lx in pid %d: remote page unavailable (%d), sending SIGBUS\n",
				   vmf->address, task_tgid_nr(current), err);
		return VM_FAULT_SIGBUS;
	}
	return 0;
}

/* ---- attachments ------------------------------------------------------- */

struct rmem_att {
	struct mmu_interval_notifier notifier;
	s32 pid;
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
			restored += rmem_fetch_and_migrate(&args, a->pid, false, false, &err);
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

static int evict_setup(struct mm_struct *mm, struct migrate_vma *args,
		       u64 start, u32 max, const struct rmem_att *a)
{
	struct vm_area_struct *vma;

	vma = vma_lookup(mm, start);
	if (!vma)
		return -EFAULT;
	if (!vma_is_anonymous(vma))
		return -EINVAL;
	args->vma = vma;
	args->start = start;
	args->end = min3((unsigned long)start + ((unsigned long)max << PAGE_SHIFT),
			 vma->vm_end, (unsigned long)a->end);
	args->pgmap_owner = &rmem_owner;
	args->flags = MIGRATE_VMA_SELECT_SYSTEM;
	return migrate_vma_setup(args);
}

static bool taken(const struct migrate_vma *args, unsigned long i)
{
	return migrate_pfn_to_page(args->src[i]) && (args->src[i] & MIGRATE_PFN_MIGRATE);
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

		if (!taken(&args, i))
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
		if (k == n || addrs[k] != addr || !taken(&args, i) || !dpages[k])
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
