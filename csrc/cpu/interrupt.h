// Ctrl-C in long CPU kernels: check_interrupt() between the iterations of a long loop (Newton-Schulz, Sinkhorn).
#pragma once

namespace wkd {

// Polls Python's signal handlers (PyErr_CheckSignals, with the GIL, which the op dispatch released) at most every
// ~50 ms of wall time per thread; a pending KeyboardInterrupt (or any exception a handler raised) is thrown as
// pybind11::error_already_set, which the Python boundary of the op call turns back into that exception. Only call it
// from the thread that runs the op, outside at::parallel_for / OpenMP regions (it returns at once inside one). In a
// build without WKD_PYTHON_MODULE (the CMake library) and outside a Python process it does nothing.
void check_interrupt();

}  // namespace wkd
