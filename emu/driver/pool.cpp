// The worker pool thread blocks and GEMM tiles run on: config().threads OS threads in all,
// counting the caller, which always takes part (so a launch never waits for a busy pool).
#include "emu.h"

namespace emu {

namespace {

struct Job {
    size_t n;
    const std::function<void(size_t)>* f;
    std::atomic<size_t> next{0};
    std::atomic<size_t> done{0};
    int active = 0;  // pool threads inside the job (guarded by pool_mu)
};

// Never destroyed: pool threads may still wait on them while the process exits.
std::mutex& pool_mu = *new std::mutex;
std::condition_variable& pool_cv = *new std::condition_variable;  // work for the pool
std::condition_variable& done_cv = *new std::condition_variable;  // a job finished, or a worker left one
std::deque<Job*>& jobs = *new std::deque<Job*>;

// Runs items of `j` until none is left; true if it ran the last one.
void work_on(Job* j) {
    for (;;) {
        const size_t i = j->next.fetch_add(1);
        if (i >= j->n) return;
        (*j->f)(i);
        if (j->done.fetch_add(1) + 1 == j->n) {
            std::lock_guard<std::mutex> g(pool_mu);
            done_cv.notify_all();
        }
    }
}

void worker() {
    ensure_signal_stack();
    std::unique_lock<std::mutex> g(pool_mu);
    for (;;) {
        pool_cv.wait(g, [] { return !jobs.empty(); });
        Job* j = jobs.front();
        if (j->next.load() >= j->n) {
            jobs.pop_front();  // nothing left to claim; its caller waits for the rest
            continue;
        }
        j->active++;
        g.unlock();
        work_on(j);
        g.lock();
        j->active--;
        done_cv.notify_all();
    }
}

void start_pool() {
    static std::once_flag once;
    std::call_once(once, [] {
        for (int i = 1; i < config().threads; i++) std::thread(worker).detach();
    });
}

}  // namespace

void parallel_for(size_t n, const std::function<void(size_t)>& f) {
    if (n == 0) return;
    if (n == 1 || config().threads <= 1) {
        for (size_t i = 0; i < n; i++) f(i);
        return;
    }
    start_pool();
    Job job;
    job.n = n;
    job.f = &f;
    {
        std::lock_guard<std::mutex> g(pool_mu);
        jobs.push_back(&job);
    }
    pool_cv.notify_all();
    work_on(&job);
    std::unique_lock<std::mutex> g(pool_mu);
    done_cv.wait(g, [&] { return job.done.load() == n && job.active == 0; });
    for (auto it = jobs.begin(); it != jobs.end(); ++it)
        if (*it == &job) {
            jobs.erase(it);
            break;
        }
}

}  // namespace emu
