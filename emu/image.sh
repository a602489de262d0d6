#!/usr/bin/env bash
# Builds one CPU kernel image: emu/image.sh SRC.cu OUT.so OBJDIR RUNTIME.o [sanitize]
#   1. compile SRC.cu against cuda_emu.h (force-included) to find its `extern "C"` kernels, the
#      name of its `extern __shared__` buffer (an undefined thread-local symbol) and the bytes of
#      static `__shared__` variables each kernel may use (its own, plus those of helpers that
#      belong to no kernel: an upper bound, where ptxas counts what the kernel reaches);
#   2. compile a generated source that includes SRC.cu and tabulates those kernels
#      (cuda_emu_entries.h), plus the definition of the dynamic shared memory buffer;
#   3. link them with the block runtime into OUT.so.
# With `sanitize`, step 2 compiles with GCC's kernel-address instrumentation: every load and
# store of kernel code calls the runtime's __asan_{load,store}N_noabort hooks
# (emu/runtime/sanitize.cpp), for TULU_EMU_SANITIZE's memcheck and racecheck. Scalar
# replacement, vectorization and store merging are off there, so that each access the hooks
# see is one the source makes (a uint4 copy stays one 16-byte access; two 4-byte stores stay two).
set -euo pipefail
src=$1 out=$2 obj=$3 runtime=$4 mode=${5:-plain}
here=$(cd "$(dirname "$0")" && pwd)
cxx=${CXX:-g++}
case "$(uname -m)" in x86_64) fixed=-ffixed-r15 ;; aarch64) fixed=-ffixed-x28 ;; *) echo "image.sh: x86_64 or aarch64 only" >&2; exit 1 ;; esac
# -march=native: images are built where they run (scripts/cuda-emu), and fmaf is then one
# instruction; -ffp-contract=off keeps every other product and sum rounded on its own.
flags=(-std=c++17 -O2 -g -fPIC -march=native "$fixed" -fno-extern-tls-init -ffp-contract=off -fno-strict-aliasing -fno-exceptions -fvisibility=hidden
       -Wno-unknown-pragmas -include "$here/include/cuda_emu.h" -I "$here/include" -I "$(dirname "$src")")
name=$(basename "$src" .cu)
mkdir -p "$obj"
"$cxx" "${flags[@]}" -x c++ -c "$src" -o "$obj/$name.probe.o"
kernels=$(nm --defined-only -g "$obj/$name.probe.o" | awk '$2 == "T" && $3 !~ /^_Z/ { print $3 }' | sort)
if [ -z "$kernels" ]; then echo "image.sh: $src defines no extern \"C\" kernel" >&2; exit 1; fi
shared=$(readelf -sW "$obj/$name.probe.o" | awk '$4 == "TLS" && $7 == "UND" && $8 !~ /^_Z/ { print $8 }' | sort -u)
if [ "$(echo "$shared" | grep -c .)" -gt 1 ]; then
  echo "image.sh: $src declares several extern __shared__ buffers ($shared); the emulator supports one per file" >&2
  exit 1
fi
# Static shared bytes per kernel: a thread-local defined in the file is the kernel's own when
# its mangled name is `_ZZ<len><kernel>E...` (a local of that kernel), another kernel's when it
# names another, and otherwise (a helper's, a file's) counted for every kernel.
tls=$(readelf -sW "$obj/$name.probe.o" | awk '$4 == "TLS" && $7 != "UND" { print $3, $8 }')
static_smem() {
  echo "$tls" | awk -v k="$1" -v all="$(echo $kernels)" '
    BEGIN { n = split(all, ks, " ") }
    NF == 2 {
      owner = ""
      for (i = 1; i <= n; i++) if (index($2, "_ZZ" length(ks[i]) ks[i] "E") == 1) owner = ks[i]
      if (owner == "" || owner == k) sum += $1
    }
    END { print sum + 0 }'
}
gen="$obj/$name.image.cpp"
{
  echo "#include \"$(cd "$(dirname "$src")" && pwd)/$(basename "$src")\""
  echo '#include "cuda_emu_entries.h"'
  echo 'extern "C" __attribute__((visibility("default"))) const int tulu_emu_abi_version = TULU_EMU_ABI;'
  echo "extern \"C\" __attribute__((visibility(\"default\"))) const char tulu_emu_image_name[] = \"$name\";"
  echo 'extern "C" __attribute__((visibility("default"))) const tulu_emu_kernel tulu_emu_kernels[] = {'
  for k in $kernels; do echo "    TULU_EMU_ENTRY($k, $(static_smem "$k"))"; done
  echo '    {nullptr, nullptr, 0, nullptr, nullptr, 0}};'
} >"$gen"
smem="$obj/$name.smem.cpp"
{
  echo '#include "tulu_emu_abi.h"'
  if [ -n "$shared" ]; then
    echo "thread_local __attribute__((aligned(128))) unsigned char $shared[TULU_EMU_DYNAMIC_SMEM_MAX];"
    echo "extern \"C\" __attribute__((visibility(\"default\"))) void* tulu_emu_dynamic_smem() { return $shared; }"
  else
    echo 'extern "C" __attribute__((visibility("default"))) void* tulu_emu_dynamic_smem() { return nullptr; }'
  fi
} >"$smem"
image_flags=()
if [ "$mode" = sanitize ]; then
  image_flags=(-DTULU_EMU_SANITIZE=1 -fsanitize=kernel-address --param asan-instrumentation-with-call-threshold=0
               --param asan-stack=0 --param asan-globals=0 -fno-tree-sra -fno-tree-vectorize
               -fno-tree-slp-vectorize -fno-store-merging)
fi
"$cxx" "${flags[@]}" "${image_flags[@]}" -c "$gen" -o "$obj/$name.image.o"
"$cxx" -std=c++17 -O2 -fPIC -fvisibility=hidden -I "$here/include" -c "$smem" -o "$obj/$name.smem.o"
"$cxx" -shared -o "$out.tmp" "$obj/$name.image.o" "$obj/$name.smem.o" "$runtime" -lm -Wl,-z,defs
mv "$out.tmp" "$out"
