// Waiting for a pool call from Python: without the GIL, in slices, handling signals in between, so Ctrl-C
// interrupts a long call (the call is cancelled, its workers drop it, KeyboardInterrupt is raised) within
// about kSignalPoll and leaves the operator usable. Shared by the operator bindings.
#pragma once

#include <pybind11/pybind11.h>

#include <chrono>

#include "runtime/pool_call.h"

namespace ktinject {
namespace bind {

namespace py = pybind11;

constexpr auto kSignalPoll = std::chrono::milliseconds(50);

// Runs Python's pending signal handlers (main thread only); true when one raised (e.g. KeyboardInterrupt).
inline bool signal_raised() { return PyErr_CheckSignals() != 0; }

// Waits for `call` and ends it (finish() rethrows a worker's error); called with the GIL held.
inline void finish_interruptibly(PoolCall& call) {
  while (true) {
    bool done;
    {
      py::gil_scoped_release release;
      done = call.wait_until(PoolCall::Clock::now() + kSignalPoll);
    }
    if (done) break;
    if (signal_raised()) {
      py::error_already_set interrupt;
      call.cancel();
      {
        py::gil_scoped_release release;
        call.wait_until(PoolCall::Clock::time_point::max());
      }
      throw interrupt;
    }
  }
  py::gil_scoped_release release;
  call.finish();
}

}  // namespace bind
}  // namespace ktinject
