// A persistent pool of worker threads shared by every kernel call (declarations only;
// thread_pool.cpp is compiled with the baseline flags like the bindings).
//
// Why: creating and joining std::threads costs tens of microseconds per parallel phase,
// which dominated small calls (a call has up to three phases: pack queries, sweep,
// merge). Workers are started on first use, grow to the largest thread count asked
// for, and sleep on a condition variable between calls.
//
// Safety: the caller runs tasks too and waits for the others; a second caller arriving
// while the pool is busy (two Python threads, the GIL being released) runs its tasks
// on threads of its own instead of waiting. After fork() the child starts a fresh pool
// (pthread_atfork): the parent's workers do not exist there. An exception thrown by a
// task is rethrown in the caller after every task has finished.
#pragma once
#include <cstdint>

namespace pyfk {

using TaskFn = void (*)(void* ctx, int64_t task);

// Run fn(ctx, task) for every task in [0, tasks) on up to `threads` threads (the caller
// included); returns when all have finished.
void parallel_for(int64_t tasks, int threads, TaskFn fn, void* ctx);

// Worker threads started so far in this process (not counting callers).
int pool_workers();

}  // namespace pyfk
