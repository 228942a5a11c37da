// check_interrupt (interrupt.h): the way a pybind11 extension sees Ctrl-C inside a long C++ call (pybind11 FAQ,
// "How can I properly handle Ctrl-C in long-running functions?": PyErr_CheckSignals, then error_already_set), with
// the GIL taken first when the calling thread does not hold it (torch.ops calls run their kernels without it).
#include "interrupt.h"

#include <ATen/Parallel.h>

#include <chrono>

#ifdef WKD_PYTHON_MODULE
#include <Python.h>
#include <pybind11/pybind11.h>
#endif

namespace wkd {

void check_interrupt() {
#ifdef WKD_PYTHON_MODULE
  using clock = std::chrono::steady_clock;
  thread_local clock::time_point last = clock::now();
  const clock::time_point now = clock::now();
  if (now - last < std::chrono::milliseconds(50)) return;  // taking the GIL may wait for other Python threads
  last = now;
  if (at::in_parallel_region() || !Py_IsInitialized()) return;
  if (PyGILState_Check()) {
    if (PyErr_CheckSignals() != 0) throw pybind11::error_already_set();
    return;
  }
  pybind11::gil_scoped_acquire gil;
  // error_already_set takes the pending exception while the GIL is held; it manages the GIL itself afterwards
  if (PyErr_CheckSignals() != 0) throw pybind11::error_already_set();
#endif
}

}  // namespace wkd
