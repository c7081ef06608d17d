/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * rmem: the /dev/rmem interface between the rmem kernel module and rmem-agent.
 *
 * Versioned: RMEM_IOC_INFO reports RMEM_UAPI_VERSION, and an agent refuses a
 * module whose version it does not know. Every structure has a fixed layout
 * (explicit padding, 64-bit user pointers) so 32- and 64-bit agents agree.
 * node-agent/src/kmod/uapi.rs mirrors this file; a test checks the sizes.
 *
 * Protocol, one agent at a time (a second open gets EBUSY):
 *  - ATTACH a process (pid) and a range, or every mapping (RMEM_ATTACH_ALL).
 *  - EVICT_BEGIN copies up to max_pages present pages of [start, ...)
 *    (within one mapping) into the agent's buffer; they stay mapped. The
 *    agent stores them, and once the server acknowledged every one,
 *    EVICT_COMMIT (same start and max_pages, the same buffer, one remote
 *    handle per page) moves to device-private memory each page whose
 *    contents still equal the copy; status says which. Pages written or
 *    unmapped in between stay in RAM and the agent frees their copies. No
 *    state is kept between the two calls.
 *  - WAIT returns events: FETCH (a CPU touched a remote page; answer with
 *    REPLY carrying the page's contents, or a negative errno for SIGBUS) and
 *    FREED (the last mapping of a remote page went away: munmap, exit, a
 *    copy-on-write break; the agent frees the handle on its server).
 *  - DETACH brings every remote page of the attachment back and removes it.
 *  - LIST describes the attachments the module holds (a restarted agent
 *    learns the ones it made before; they outlive its open file).
 */
#ifndef _UAPI_RMEM_H
#define _UAPI_RMEM_H

#include <linux/ioctl.h>
#include <linux/types.h>

#define RMEM_UAPI_VERSION 5
#define RMEM_PAGE_SIZE 4096
#define RMEM_MAX_BATCH 512

struct rmem_info {
	__u32 version;
	__u32 page_size;
	__u64 capacity_pages;	/* device-private pages the module can hold */
	__u64 pages_in_use;	/* device-private pages holding remote data */
	__u64 faults;		/* pages brought back by CPU faults */
	__u64 restored;		/* pages brought back by DETACH */
	__u64 evicted;		/* pages moved to device-private memory */
	__u64 fetch_timeouts;	/* faults that ended in SIGBUS */
	__u32 attachments;
	__u32 agent_pid;	/* the agent that has /dev/rmem open, or 0 */
	__u64 prefetched;	/* of `faults`, pages brought back ahead of a fault */
	__u64 retried;		/* faults that dropped the mmap_lock while fetching */
	__u64 skipped_ksm;	/* pages eviction left in RAM: KSM's (merged, or mergeable) */
	__u64 skipped_locked;	/* pages eviction left in RAM: mlocked mappings */
	__u64 skipped_mappings;	/* pages eviction left in RAM: other mappings it never takes */
	__u64 stuck_faults;	/* faults whose page could not move for fault_timeout_ms: SIGBUS */
};

#define RMEM_ATTACH_ALL (1u << 0)	/* every mapping; start and len ignored */

struct rmem_attach {
	__s32 pid;
	__u32 flags;
	__u64 start;
	__u64 len;
	__u64 id;		/* out */
};

#define RMEM_ATT_EXITED (1u << 1)	/* LIST: its process has exited */

struct rmem_att_info {
	__u64 id;
	__s32 pid;
	__u32 flags;		/* RMEM_ATTACH_ALL, RMEM_ATT_EXITED */
	__u64 start;		/* 0 and 0 with RMEM_ATTACH_ALL */
	__u64 len;
};

struct rmem_list {
	__u32 max;		/* room in atts */
	__u32 count;		/* out: attachments held (may exceed max) */
	__u64 atts;		/* user pointer: max struct rmem_att_info */
};

struct rmem_detach {
	__u64 id;
	__u64 restored;		/* out: pages brought back */
};

struct rmem_evict {
	__u64 id;		/* attachment */
	__u64 start;		/* page-aligned */
	__u32 max_pages;	/* at most RMEM_MAX_BATCH */
	__u32 npages;		/* out: pages copied */
	__u64 data;		/* user pointer: max_pages * RMEM_PAGE_SIZE bytes */
	__u64 addrs;		/* user pointer: max_pages __u64, out: page addresses */
};

struct rmem_commit {
	__u64 id;		/* attachment */
	__u64 start;		/* as in EVICT_BEGIN */
	__u32 max_pages;	/* as in EVICT_BEGIN */
	__u32 npages;		/* pages copied by EVICT_BEGIN */
	__u64 addrs;		/* user pointer: npages __u64, ascending */
	__u64 handles;		/* user pointer: npages __u64 (~0: keep local) */
	__u64 data;		/* user pointer: the copies, npages pages */
	__u64 status;		/* user pointer: npages __u8, out: 1 moved, 0 kept local */
	__u32 moved;		/* out: pages now remote */
	__u32 pad;
};

#define RMEM_EVENT_FETCH 1
#define RMEM_EVENT_FREED 2

struct rmem_event {
	__u32 kind;
	__u32 pid;		/* FETCH: the faulting task's tgid */
	__u64 id;		/* FETCH: the request to REPLY to */
	__u64 handle;
	__u64 addr;		/* FETCH: the faulting address */
};

struct rmem_wait {
	__u32 max;		/* room in events */
	__u32 count;		/* out */
	__u32 timeout_ms;	/* 0: do not block */
	__u32 pad;
	__u64 events;		/* user pointer: max struct rmem_event */
};

struct rmem_reply {
	__u64 id;
	__s32 error;		/* 0, or a negative errno: the fault gets SIGBUS */
	__u32 pad;
	__u64 data;		/* user pointer: RMEM_PAGE_SIZE bytes */
};

#define RMEM_IOC_MAGIC 'R'
#define RMEM_IOC_INFO		_IOR(RMEM_IOC_MAGIC, 0x00, struct rmem_info)
#define RMEM_IOC_ATTACH		_IOWR(RMEM_IOC_MAGIC, 0x01, struct rmem_attach)
#define RMEM_IOC_DETACH		_IOWR(RMEM_IOC_MAGIC, 0x02, struct rmem_detach)
#define RMEM_IOC_EVICT_BEGIN	_IOWR(RMEM_IOC_MAGIC, 0x03, struct rmem_evict)
#define RMEM_IOC_EVICT_COMMIT	_IOWR(RMEM_IOC_MAGIC, 0x04, struct rmem_commit)
#define RMEM_IOC_WAIT		_IOWR(RMEM_IOC_MAGIC, 0x06, struct rmem_wait)
#define RMEM_IOC_REPLY		_IOW(RMEM_IOC_MAGIC, 0x07, struct rmem_reply)
#define RMEM_IOC_LIST		_IOWR(RMEM_IOC_MAGIC, 0x08, struct rmem_list)

#endif /* _UAPI_RMEM_H */
