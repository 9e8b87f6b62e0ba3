// Fresh large CPU outputs: ask Linux for transparent huge pages before the first write.
//
// A new [N, V] gradient (e.g. 4096 x 32000 fp32 = 524 MB) comes straight from mmap; with 4 KB
// pages its first touch costs one page fault per 4 KB, which on this project's CI machines
// took longer than computing the gradient itself. With THP in "madvise" mode (the common
// distribution default) MADV_HUGEPAGE on the buffer turns that into one fault per 2 MB.
// Advice only: no effect on values, silently ignored where unsupported.
#pragma once

#include <ATen/ATen.h>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace pydistill {

inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const size_t bytes = t.numel() * t.element_size();
  if (bytes < 2 * kHuge || !t.device().is_cpu()) return;
  const auto p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (p + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (p + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

}  // namespace pydistill
