// The batched-transfer threads.
#include "store/io_pool.h"

#include <algorithm>

namespace paged_kv::store {

IoPool::IoPool(int threads) {
  for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { work(); });
}

IoPool::~IoPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  work_ready_.notify_all();
  for (std::thread& worker : workers_) worker.join();
}

bool IoPool::take_from(Job* job, size_t* index) {
  if (job->next >= job->count) return false;
  *index = job->next++;
  if (job->next == job->count) {
    auto it = std::find(queue_.begin(), queue_.end(), job);
    if (it != queue_.end()) queue_.erase(it);
  }
  return true;
}

bool IoPool::take(Job** job, size_t* index) {
  while (!queue_.empty()) {
    Job* front = queue_.front();
    if (take_from(front, index)) {
      *job = front;
      return true;
    }
    queue_.pop_front();  // not reached: a job leaves the queue with its last index
  }
  return false;
}

void IoPool::work() {
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    work_ready_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
    if (stopping_) return;
    Job* job = nullptr;
    size_t index = 0;
    if (!take(&job, &index)) continue;
    lock.unlock();
    (*job->task)(index);
    lock.lock();
    // The job's owner waits for this count under the same mutex, so `job` stays alive here.
    if (++job->finished == job->count) job->all_finished.notify_all();
  }
}

void IoPool::run(size_t count, const std::function<void(size_t)>& task) {
  if (count == 0) return;
  Job job;
  job.task = &task;
  job.count = count;
  std::unique_lock<std::mutex> lock(mutex_);
  if (!workers_.empty() && count > 1) {
    queue_.push_back(&job);
    work_ready_.notify_all();
  }
  size_t index = 0;
  while (take_from(&job, &index)) {
    lock.unlock();
    task(index);
    lock.lock();
    ++job.finished;
  }
  job.all_finished.wait(lock, [&job] { return job.finished == job.count; });
}

}  // namespace paged_kv::store
