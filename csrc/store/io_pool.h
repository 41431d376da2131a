// A fixed set of threads that runs the disk store's batched transfers (torch-free).
//
// run(count, task) calls task(i) for every i in [0, count) with up to `threads` calls in flight
// (the calling thread works too, so `threads` - 1 are kept), and returns when all are done.
// Several threads may call run at once; their tasks share the workers.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace paged_kv::store {

class IoPool {
 public:
  explicit IoPool(int threads);
  ~IoPool();
  IoPool(const IoPool&) = delete;
  IoPool& operator=(const IoPool&) = delete;

  int threads() const { return static_cast<int>(workers_.size()) + 1; }

  // `task` must not throw (the store's tasks record their failures instead).
  void run(size_t count, const std::function<void(size_t)>& task);

 private:
  struct Job {
    const std::function<void(size_t)>* task;
    size_t count;
    size_t next = 0;      // the next index to hand out
    size_t finished = 0;  // indices done
    std::condition_variable all_finished;
  };

  // Under mutex_: takes the next index of the oldest job that has one, dropping a job from the
  // queue once all its indices are handed out. Returns false when the queue is empty.
  bool take(Job** job, size_t* index);
  // Under mutex_: takes the next index of `job`, if any is left.
  bool take_from(Job* job, size_t* index);
  void work();

  std::mutex mutex_;
  std::condition_variable work_ready_;
  std::deque<Job*> queue_;
  bool stopping_ = false;
  std::vector<std::thread> workers_;
};

}  // namespace paged_kv::store
