// The table of a CPU kernel image's entry points. The image's generated source includes the
// kernel file, then this header, then one TULU_EMU_ENTRY(name) per `extern "C"` kernel (found in
// a first compile's symbol table: token-pasted names such as gemv_decode_bf16_##M included).
// Template deduction on each kernel's own type gives the parameter sizes and the trampoline
// that turns cuLaunchKernel's `void** params` into a call.
#pragma once

#include <type_traits>
#include <utility>

#include "tulu_emu_abi.h"

namespace tulu_emu {

template <class... A>
struct Entry {
    template <void (*F)(A...), size_t... I>
    static void call_with(void** p, std::index_sequence<I...>) {
        F(*static_cast<typename std::decay<A>::type*>(p[I])...);
    }
    template <void (*F)(A...)>
    static void call(void** p) {
        call_with<F>(p, std::index_sequence_for<A...>{});
    }
    static constexpr unsigned short sizes[sizeof...(A) + 1] = {(unsigned short)sizeof(A)..., 0};
    static constexpr unsigned short aligns[sizeof...(A) + 1] = {(unsigned short)alignof(A)..., 1};
};

template <class... A>
Entry<A...> entry_of(void (*)(A...));

}  // namespace tulu_emu

#define TULU_EMU_ENTRY(fn, smem)                                                                      \
    {#fn, &decltype(::tulu_emu::entry_of(&fn))::template call<&fn>,                              \
     (int)(sizeof(decltype(::tulu_emu::entry_of(&fn))::sizes) / sizeof(unsigned short) - 1),      \
     decltype(::tulu_emu::entry_of(&fn))::sizes, decltype(::tulu_emu::entry_of(&fn))::aligns, smem},
