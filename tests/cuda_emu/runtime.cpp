// runtime.cpp: the non-template part of the CUDA emulation (tests/cuda_emu/include/cuda_emu.h): one
// cooperative fiber per CUDA thread, a scheduler per block, and the barriers (__syncthreads, and the two
// warp barriers of every __shfl_down_sync).
//
// Scheduling. run_block() makes passes over the block's threads, in index order (schedule_mode() 0) or
// reversed (1). In a pass, every runnable thread runs until it finishes or reaches a barrier; a thread
// that has not started yet is started then. A barrier is released (its waiters made runnable) when the
// last thread of its scope (block or warp) arrives; released threads run in the same pass if they come
// later in it, else in the next. So threads are serialised between barriers: which thread runs first
// between two barriers is fixed by the schedule mode, never interleaved at finer grain.
//
// Divergence. Every thread of the scope must reach the same barrier (same call site). A thread reaching
// a barrier at another call site than the ones already waiting, a scope whose remaining threads all
// exited while others wait, or a pass in which nothing could run while threads are unfinished, abandons
// the launch (its remaining threads and blocks never run) and throws std::runtime_error("cuda_emu: ...")
// naming the kernel, block and call sites; torch turns it into a RuntimeError (a real GPU would hang or
// be undefined). Not abort(): under pytest's fd capture the message of an aborting process is lost.
//
// Fibers. x86-64: a hand-rolled context switch (callee-saved registers and the stack pointer; no signal
// mask syscall as in swapcontext). Elsewhere: ucontext. Stacks (128 KiB plus a PROT_NONE guard page) are
// pooled per host thread and reused: a thread that finishes gives its stack back at once, so a kernel
// without barriers runs all its threads on one warm stack.
#include "cuda_emu.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <algorithm>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace cuda_emu {
namespace detail {
namespace {

constexpr size_t kStackBytes = 128 * 1024;

#if defined(__x86_64__)
extern "C" void cuda_emu_switch(void** save_sp, void* new_sp);
extern "C" void cuda_emu_fiber_start();
// cuda_emu_switch(save, next): push the callee-saved registers, store rsp in *save, load next, pop, ret.
// A new fiber's stack is laid out as if it had switched out at cuda_emu_fiber_start, which calls
// r12(rbx).
asm(R"(
  .text
  .globl cuda_emu_switch
  .hidden cuda_emu_switch
  .type cuda_emu_switch, @function
cuda_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_emu_switch, .-cuda_emu_switch

  .globl cuda_emu_fiber_start
  .hidden cuda_emu_fiber_start
  .type cuda_emu_fiber_start, @function
cuda_emu_fiber_start:
  movq %rbx, %rdi
  callq *%r12
  ud2
  .size cuda_emu_fiber_start, .-cuda_emu_fiber_start
)");
#endif

// Errors on the scheduler's (the caller's) stack throw; run_block abandons the block first.
[[noreturn]] void die(const std::string& message) { throw std::runtime_error("cuda_emu: " + message); }

// The kernel's symbol when it is exported, else its parameter types (kernels in anonymous namespaces).
std::string kernel_name(const void* kernel, const char* signature) {
  Dl_info info{};
  if (kernel == nullptr || dladdr(kernel, &info) == 0 || info.dli_sname == nullptr || info.dli_saddr != kernel) {
    std::string sig = signature ? signature : "";
    const size_t from = sig.find("P = {");
    if (from != std::string::npos) {  // "P = {...}", braces balanced ("{anonymous}")
      size_t to = from + 5;
      for (int depth = 1; to < sig.size(); ++to) {
        depth += sig[to] == '{' ? 1 : sig[to] == '}' ? -1 : 0;
        if (depth == 0) break;
      }
      sig = sig.substr(from + 5, to - from - 5);
    }
    return "the kernel taking (" + sig + ")";
  }
  int status = 0;
  char* demangled = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
  std::string name = status == 0 && demangled ? demangled : info.dli_sname;
  std::free(demangled);
  return name;
}

struct StackPool {
  std::vector<char*> free;  // usable region [p, p + kStackBytes); a guard page below p
  size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  std::vector<char*> all;
  char* take() {
    if (!free.empty()) {
      char* p = free.back();
      free.pop_back();
      return p;
    }
    void* m = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (m == MAP_FAILED) die("cannot map a fiber stack");
    mprotect(m, page, PROT_NONE);  // overflow faults instead of corrupting the next stack
    all.push_back(static_cast<char*>(m));
    return static_cast<char*>(m) + page;
  }
  void give(char* p) { free.push_back(p); }
  ~StackPool() {
    for (char* m : all) munmap(m, kStackBytes + page);
  }
};

enum class State : unsigned char { NotStarted, Runnable, AtBlockBarrier, AtWarpBarrier, Done };

struct Thread {
  State state;
  char* stack;
  void* sp;  // saved stack pointer while switched out (x86-64)
#if !defined(__x86_64__)
  ucontext_t ctx;
#endif
  const char* file;  // barrier call site while waiting
  int line;
};

struct Barrier {
  int arrived = 0;
  int exited = 0;  // threads of the scope that finished
  int size = 0;    // threads in the scope
  const char* file = nullptr;
  int line = 0;
};

struct Warp {
  Barrier barrier;
  unsigned long long slots[32];
};

struct Block {
  ThreadBody body = nullptr;
  void* ctx = nullptr;
  const void* kernel = nullptr;
  const char* signature = nullptr;
  dim3 dim;
  int n = 0;
  int current = -1;
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  Barrier block_barrier;
  void* sched_sp = nullptr;
  std::string error;  // set by a fiber that failed; the scheduler throws it
#if !defined(__x86_64__)
  ucontext_t sched_ctx;
#endif
};

thread_local StackPool t_stacks;
thread_local Block t_block;
thread_local Block* t_active = nullptr;  // the block being run on this host thread, if any

long long g_block_barriers = 0, g_warp_barriers = 0, g_fibers = 0;
int g_schedule_mode = 0;

std::string where(const Block& b) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "block (%u, %u, %u) of %d threads", block_idx.x, block_idx.y, block_idx.z, b.n);
  return kernel_name(b.kernel, b.signature) + ", " + buf;
}

std::string thread_name(const Block& b, int i) {
  const unsigned int x = i % b.dim.x, y = (i / b.dim.x) % b.dim.y, z = i / (b.dim.x * b.dim.y);
  char buf[96];
  std::snprintf(buf, sizeof buf, "thread (%u, %u, %u) (warp %d, lane %d)", x, y, z, i / 32, i % 32);
  return buf;
}

// file:line with the file's last two path components (the build compiles copies in a staging folder).
std::string site(const char* file, int line) {
  std::string f = file ? file : "?";
  const size_t last = f.rfind('/');
  if (last != std::string::npos && last > 0) {
    const size_t before = f.rfind('/', last - 1);
    if (before != std::string::npos) f = f.substr(before + 1);
  }
  return f + ":" + std::to_string(line);
}

// A summary of every unfinished thread's state, for the abort messages.
std::string census(const Block& b) {
  std::string out;
  int exited = 0, not_started = 0, runnable = 0;
  std::vector<std::pair<std::string, int>> waits;  // "kind at site" -> count
  for (const Thread& t : b.threads) {
    switch (t.state) {
      case State::Done: ++exited; break;
      case State::NotStarted: ++not_started; break;
      case State::Runnable: ++runnable; break;
      default: {
        const std::string key = std::string(t.state == State::AtBlockBarrier ? "__syncthreads()" : "a warp barrier "
                                            "(__shfl_down_sync)") + " at " + site(t.file, t.line);
        bool found = false;
        for (auto& w : waits) {
          if (w.first == key) {
            ++w.second;
            found = true;
          }
        }
        if (!found) waits.emplace_back(key, 1);
      }
    }
  }
  for (const auto& w : waits) out += "\n  " + std::to_string(w.second) + " thread(s) waiting at " + w.first;
  out += "\n  " + std::to_string(exited) + " thread(s) exited, " + std::to_string(runnable) + " runnable, " +
         std::to_string(not_started) + " not started";
  return out;
}

void switch_to_scheduler(Block& b, Thread& t) {
#if defined(__x86_64__)
  cuda_emu_switch(&t.sp, b.sched_sp);
#else
  swapcontext(&t.ctx, &b.sched_ctx);
#endif
}

// An error inside a fiber: exceptions cannot unwind through the fiber's entry, so the fiber records the
// message and switches to the scheduler for good; run_block abandons the block and throws it.
[[noreturn]] void fail(Block& b, const std::string& message) {
  b.error = message;
  switch_to_scheduler(b, b.threads[b.current]);
  __builtin_trap();  // never resumed
}

extern "C" void cuda_emu_fiber_main(void* arg) {
  Block& b = *static_cast<Block*>(arg);
  b.body(b.ctx);
  Thread& t = b.threads[b.current];
  t.state = State::Done;
  switch_to_scheduler(b, t);  // never resumed
  __builtin_trap();
}

#if !defined(__x86_64__)
void fiber_entry_uc(unsigned int hi, unsigned int lo) {
  cuda_emu_fiber_main(reinterpret_cast<void*>((static_cast<uintptr_t>(hi) << 32) | lo));
}
#endif

void start_fiber(Block& b, Thread& t) {
  t.stack = t_stacks.take();
#if defined(__x86_64__)
  uintptr_t top = reinterpret_cast<uintptr_t>(t.stack + kStackBytes) & ~uintptr_t{15};
  void** sp = reinterpret_cast<void**>(top - 72);  // 16-aligned rsp when cuda_emu_fiber_start calls r12
  sp[0] = nullptr;                                                    // r15
  sp[1] = nullptr;                                                    // r14
  sp[2] = nullptr;                                                    // r13
  sp[3] = reinterpret_cast<void*>(&cuda_emu_fiber_main);             // r12
  sp[4] = &b;                                                         // rbx
  sp[5] = nullptr;                                                    // rbp
  sp[6] = reinterpret_cast<void*>(&cuda_emu_fiber_start);            // return address
  sp[7] = nullptr;
  sp[8] = nullptr;
  t.sp = sp;
#else
  getcontext(&t.ctx);
  t.ctx.uc_stack.ss_sp = t.stack;
  t.ctx.uc_stack.ss_size = kStackBytes;
  t.ctx.uc_link = nullptr;
  const uintptr_t p = reinterpret_cast<uintptr_t>(&b);
  makecontext(&t.ctx, reinterpret_cast<void (*)()>(&fiber_entry_uc), 2, static_cast<unsigned int>(p >> 32),
              static_cast<unsigned int>(p & 0xffffffffu));
#endif
  ++g_fibers;
}

void resume(Block& b, int i) {
  Thread& t = b.threads[i];
  b.current = i;
  thread_idx = uint3{i % b.dim.x, (i / b.dim.x) % b.dim.y, i / (b.dim.x * b.dim.y)};
#if defined(__x86_64__)
  cuda_emu_switch(&b.sched_sp, t.sp);
#else
  swapcontext(&b.sched_ctx, &t.ctx);
#endif
}

Block& active(const char* what) {
  if (t_active == nullptr || t_active->current < 0) die(std::string(what) + " called outside a kernel");
  return *t_active;
}

// Gives back the stacks of a block abandoned after an error, and throws it.
[[noreturn]] void abandon(Block& b) {
  for (Thread& t : b.threads) {
    if (t.stack != nullptr) t_stacks.give(t.stack);
    t.stack = nullptr;
  }
  b.current = -1;
  t_active = nullptr;
  std::string message;
  message.swap(b.error);
  die(message);
}

// The calling thread arrives at `bar` (scope: the block, or one warp), then yields to the scheduler.
void arrive(Block& b, Barrier& bar, State waiting, int first, int stride_end, const char* file, int line,
            const char* what) {
  Thread& me = b.threads[b.current];
  if (bar.arrived == 0) {
    bar.file = file;
    bar.line = line;
  } else if (bar.line != line || std::strcmp(bar.file, file) != 0) {
    fail(b, std::string("divergent ") + what + " in " + where(b) + ": " + thread_name(b, b.current) + " reached " +
        site(file, line) + " while other threads wait at " + site(bar.file, bar.line) + census(b));
  }
  me.state = waiting;
  me.file = file;
  me.line = line;
  ++bar.arrived;
  if (bar.arrived == bar.size) {  // the last one: release the scope
    for (int i = first; i < stride_end; ++i) b.threads[i].state = State::Runnable;
    bar.arrived = 0;
    if (waiting == State::AtBlockBarrier) ++g_block_barriers; else ++g_warp_barriers;
  } else if (bar.arrived + bar.exited == bar.size) {
    fail(b, std::string("divergent ") + what + " in " + where(b) + ": " + std::to_string(bar.exited) +
        " thread(s) of the scope exited, so the barrier at " + site(file, line) + " can never complete" + census(b));
  }
  switch_to_scheduler(b, me);
}

}  // namespace

int& schedule_mode() { return g_schedule_mode; }

long long sync_stat(int which) {
  return which == 0 ? g_block_barriers : which == 1 ? g_warp_barriers : g_fibers;
}

void run_block(ThreadBody body, void* ctx, dim3 block, const void* kernel, const char* signature) {
  if (t_active != nullptr) {
    fail(*t_active, "a kernel launched from inside a kernel (dynamic parallelism is not emulated)");
  }
  Block& b = t_block;
  b.body = body;
  b.ctx = ctx;
  b.kernel = kernel;
  b.signature = signature;
  b.dim = block;
  b.n = static_cast<int>(block.x * block.y * block.z);
  b.current = -1;
  b.threads.assign(b.n, Thread{});
  b.warps.assign((b.n + 31) / 32, Warp{});
  for (size_t w = 0; w < b.warps.size(); ++w) b.warps[w].barrier.size = std::min(32, b.n - static_cast<int>(w) * 32);
  b.block_barrier = Barrier{};
  b.block_barrier.size = b.n;
  t_active = &b;
  const bool reverse = g_schedule_mode == 1;
  int done = 0;
  while (done < b.n) {
    bool progressed = false;
    for (int k = 0; k < b.n; ++k) {
      const int i = reverse ? b.n - 1 - k : k;
      Thread& t = b.threads[i];
      if (t.state == State::NotStarted) {
        start_fiber(b, t);
        t.state = State::Runnable;
      }
      if (t.state != State::Runnable) continue;
      resume(b, i);
      progressed = true;
      if (!b.error.empty()) abandon(b);
      if (t.state == State::Done) {
        t_stacks.give(t.stack);
        t.stack = nullptr;
        ++done;
        Barrier& warp = b.warps[i / 32].barrier;
        ++warp.exited;
        ++b.block_barrier.exited;
        // Threads still waiting for this one can never be released.
        if (b.block_barrier.arrived > 0 && b.block_barrier.arrived + b.block_barrier.exited == b.n) {
          b.error = ("divergent __syncthreads() in " + where(b) + ": " + thread_name(b, i) + " exited while " +
              std::to_string(b.block_barrier.arrived) + " thread(s) wait at " +
              site(b.block_barrier.file, b.block_barrier.line) + census(b));
          abandon(b);
        }
        if (warp.arrived > 0 && warp.arrived + warp.exited == warp.size) {
          b.error = ("divergent warp barrier (__shfl_down_sync) in " + where(b) + ": " + thread_name(b, i) +
              " exited while " + std::to_string(warp.arrived) + " lane(s) of its warp wait at " +
              site(warp.file, warp.line) + census(b));
          abandon(b);
        }
      }
    }
    if (!progressed) {
      b.error = "deadlock in " + where(b) + ": no thread can run" + census(b);
      abandon(b);
    }
  }
  b.current = -1;
  t_active = nullptr;
}

void syncthreads(const char* file, int line) {
  Block& b = active("__syncthreads()");
  arrive(b, b.block_barrier, State::AtBlockBarrier, 0, b.n, file, line, "__syncthreads()");
}

unsigned long long shfl_down_bits(unsigned int mask, unsigned long long bits, unsigned int delta, int width,
                                  const char* file, int line) {
  Block& b = active("__shfl_down_sync");
  if (mask != 0xffffffffu) {
    fail(b, "__shfl_down_sync with mask " + std::to_string(mask) + " at " + site(file, line) +
        ": only the full mask 0xffffffff is emulated");
  }
  if (width != 32) fail(b, "__shfl_down_sync with width " + std::to_string(width) + " at " + site(file, line) +
                       ": only width 32 is emulated");
  const int i = b.current, w = i / 32, lane = i % 32;
  Warp& warp = b.warps[w];
  if (warp.barrier.size != 32) {
    fail(b, "__shfl_down_sync with the full mask at " + site(file, line) + " in a warp of " +
        std::to_string(warp.barrier.size) + " threads (" + where(b) + ", not a multiple of 32)");
  }
  warp.slots[lane] = bits;
  arrive(b, warp.barrier, State::AtWarpBarrier, w * 32, w * 32 + 32, file, line, "__shfl_down_sync");
  // CUDA: lanes whose source lane + delta falls outside the warp keep their own value.
  const unsigned long long out = static_cast<unsigned long long>(lane) + delta < 32 ? warp.slots[lane + delta] : bits;
  arrive(b, warp.barrier, State::AtWarpBarrier, w * 32, w * 32 + 32, file, line, "__shfl_down_sync");
  return out;
}

}  // namespace detail
}  // namespace cuda_emu
