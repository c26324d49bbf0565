// Persistent worker pool (see thread_pool.hpp).
#include "thread_pool.hpp"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace pyfk {
namespace {

struct Job {
  TaskFn fn = nullptr;
  void* ctx = nullptr;
  int64_t tasks = 0;
  std::atomic<int64_t> next{0};
  std::exception_ptr error;
  std::mutex error_mutex;

  // Take tasks until none is left; keep the first exception.
  void run() {
    for (int64_t t = next.fetch_add(1); t < tasks; t = next.fetch_add(1)) {
      try {
        fn(ctx, t);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
      }
    }
  }
};

struct Pool {
  std::mutex mutex;
  std::condition_variable wake, done;
  int workers = 0;           // started (detached) worker threads, ids 1..workers
  uint64_t generation = 0;   // bumped once per job
  int wanted = 0;            // workers (by id) that take part in the current job
  int active = 0;            // of those, still running
  bool busy = false;
  Job* job = nullptr;

  void worker(int id) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex);
    for (;;) {
      wake.wait(lock, [&] { return generation != seen; });
      seen = generation;
      if (id > wanted) continue;  // not needed this time
      Job* j = job;
      lock.unlock();
      j->run();
      lock.lock();
      if (--active == 0) done.notify_all();
    }
  }
};

// Never destroyed: detached workers may still wait on its condition variable at exit.
std::atomic<Pool*> the_pool{nullptr};
std::once_flag atfork_once;

void forget_pool_in_child() { the_pool.store(nullptr); }  // the parent's workers are not here

Pool* pool() {
  std::call_once(atfork_once, [] { pthread_atfork(nullptr, nullptr, forget_pool_in_child); });
  Pool* p = the_pool.load();
  if (p) return p;
  Pool* fresh = new Pool();
  if (the_pool.compare_exchange_strong(p, fresh)) return fresh;
  delete fresh;  // another caller won the race
  return p;
}

void run_on_own_threads(Job& job, int threads) {
  std::vector<std::thread> own;
  for (int t = 1; t < threads; ++t) own.emplace_back([&job] { job.run(); });
  job.run();
  for (auto& th : own) th.join();
}

}  // namespace

void parallel_for(int64_t tasks, int threads, TaskFn fn, void* ctx) {
  if (tasks <= 0) return;
  Job job;
  job.fn = fn;
  job.ctx = ctx;
  job.tasks = tasks;
  const int helpers = static_cast<int>(std::min<int64_t>(std::max(threads, 1), tasks)) - 1;
  if (helpers == 0) {
    job.run();
  } else {
    Pool* p = pool();
    std::unique_lock<std::mutex> lock(p->mutex);
    if (p->busy) {  // another call holds the pool: do not queue behind it
      lock.unlock();
      run_on_own_threads(job, helpers + 1);
    } else {
      p->busy = true;
      for (; p->workers < helpers; ++p->workers) {
        const int id = p->workers + 1;
        std::thread([p, id] { p->worker(id); }).detach();
      }
      p->job = &job;
      p->wanted = helpers;
      p->active = helpers;
      ++p->generation;
      lock.unlock();
      p->wake.notify_all();
      job.run();
      lock.lock();
      p->done.wait(lock, [&] { return p->active == 0; });
      p->job = nullptr;
      p->busy = false;
    }
  }
  if (job.error) std::rethrow_exception(job.error);
}

int pool_workers() {
  Pool* p = the_pool.load();
  if (!p) return 0;
  std::lock_guard<std::mutex> lock(p->mutex);
  return p->workers;
}

}  // namespace pyfk
