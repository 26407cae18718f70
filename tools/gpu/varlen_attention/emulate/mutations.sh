#!/usr/bin/env bash
# Negative controls for check.sh: each mutation of the kernel source must make it FAIL. The first
# list mutates the fp16 head_dim 64/128 kernel (attention_f16_v4: 32 query rows a warp; the full
# check.sh), the second the ALiBi code (contract version 2) of every kernel family (check.sh --quick:
# the ALiBi cases).
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
src="$here/../../../../plugins/varlen_attention/varlen_attention.cu"
tmp="$(mktemp -d)"
status=0
mutate() {  # name, sed expression (must change the file), check.sh arguments (default: none)
  sed "$2" "$src" >"$tmp/k.cu"
  if cmp -s "$src" "$tmp/k.cu"; then echo "mutation $1 did not apply"; status=1; return; fi
  local args=("${@:3}")
  if VARLEN_SRC="$tmp/k.cu" bash "$here/check.sh" "${args[@]}" >"$tmp/log" 2>&1; then
    echo "NOT DETECTED: $1"; status=1
  else
    echo "detected: $1 ($(grep -c FAIL "$tmp/log") failing cases)"
  fi
}
mutate "second m16 tile rows" 's/(i \* HM + warp \* 16 + (lane % 16))/(i * (HM - 16) + warp * 16 + (lane % 16))/'
mutate "no wait for the k/v tile" 's/cp_async_wait<1>();  \/\/ this tile.s group has landed (tile 0/cp_async_wait<2>();  \/\/ (tile 0/'
# (Dropping only the -inf mask before the max is not detectable on random data: masked keys score
# exactly 0 and their p are zeroed afterwards; the mask matters when every real score is far below 0.)
mutate "masked key bound off by one" 's/if (j \* 8 + (lane % 4) \* 2 + (e \& 1) >= nk) s\[i\]\[j\]\[e\] = 0.0f;/if (j * 8 + (lane % 4) * 2 + (e \& 1) > nk) s[i][j][e] = 0.0f;/'
mutate "no zeroing of masked p" 's/if constexpr (PARTIAL) {  \/\/ -inf/if constexpr (false) {  \/\/ -inf/'
mutate "negative scale not folded into q" 's/scale < 0.0f ? 0x80008000u : 0u/0u/'
mutate "32-ary search off by one" 's/    hi = min(hi, lo + step - 1);/    hi = min(hi, lo + step - 1) - (step > 1);/'
mutate "one m16 tile per warp only" 's/(HM + warp \* 16 < nq ? 1 : 0)/0/'
mutate "D=128: second tile's q from shared memory not sign-flipped" 's/      for (int e = 0; e < 4; ++e) a1\[e\] ^= sign;//'
mutate "D=128: second tile's q read from the wrong rows" 's/const q1 = sQ + (HM + warp \* 16/const q1 = sQ + (warp * 16/'
mutate "D=128: k rotated into the q slot" 's/rotate_tile<T, D, BN, LDS>(kraw(buf), kt,/rotate_tile<T, D, BN, LDS>(sK, kt,/'
mutate "rotated k slot aliases raw k" 's/uint16_t\* const sK = smem + TILE;  \/\/ rotated k/uint16_t* const sK = smem + 2 * TILE;/'
# ALiBi: the 8-warp 16-bit kernel (fp16 D = 32, bf16), fp32, and the fp16 D = 64/128 kernel.
mutate "ALiBi: bias dropped (16-bit)" 's/fmaf(-slope_l2, dist, s\[j\]\[e\] \* sl2)/s[j][e] * sl2/' --quick
mutate "ALiBi: bias dropped (fp32)" 's/sc = fmaf(-slope, fabsf/sc = fmaf(0.0f * slope, fabsf/' --quick
mutate "ALiBi: slopes in reversed head order" 's/ALIBI ? alibi.slope\[blockIdx.y\]/ALIBI ? alibi.slope[num_heads - 1 - blockIdx.y]/' --quick
mutate "ALiBi: bias sign flipped" 's/fmaf(-slope_l2, dist,/fmaf(slope_l2, dist,/' --quick
mutate "ALiBi: query offset from the pack start" 's/const int rel0 = w.q0 + warp/const int rel0 = w.start + w.q0 + warp/' --quick
mutate "ALiBi: rows lane/4 + 8 at the offset of lane/4" 's/static_cast<float>((e >> 1) \* 8 - j \* 8 - (e \& 1))/static_cast<float>(-j * 8 - (e \& 1))/' --quick
mutate "ALiBi fp16 D=64/128: second m16 tile at the first one's offsets" 's/rel + static_cast<float>(i \* BN + (e >> 1)/rel + static_cast<float>((e >> 1)/' --quick
mutate "ALiBi fp16 D=64/128: bias after the mask and max (scale folded twice)" 's/  const float k2 = ALIBI ? 1.0f : sl2;/  const float k2 = sl2;/' --quick
exit $status
