// Generated from gradreg_kernels/activation_table.py by its write_header();
// do not edit by hand.
// The activation codes the CPU and CUDA kernels switch on (those of the Python table).
#pragma once

namespace gradreg {
namespace act_code {

constexpr int kRelu = 0;
constexpr int kLeakyRelu = 1;
constexpr int kSoftplus = 2;
constexpr int kTanh = 3;
constexpr int kSigmoid = 4;
constexpr int kGelu = 5;
constexpr int kGeluTanh = 6;
constexpr int kElu = 7;
constexpr int kSilu = 8;
constexpr int kMish = 9;
constexpr int kHardswish = 10;

}  // namespace act_code
}  // namespace gradreg
