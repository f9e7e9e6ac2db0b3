// CPU implementations of the oneref ops.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_IMPL(oneref, CPU, m) {
  m.impl("referring_mask", &oneref::referring_mask_cpu);
  m.impl("masked_gather", &oneref::masked_gather_cpu);
  m.impl("masked_scatter", &oneref::masked_scatter_cpu);
  m.impl("apply_mask_token", &oneref::apply_mask_token_cpu);
  m.impl("vts_loss", &oneref::vts_loss_cpu);
  m.impl("vts_loss_backward", &oneref::vts_loss_backward_cpu);
  m.impl("box_mask_loss", &oneref::box_mask_loss_cpu);
  m.impl("box_mask_loss_backward", &oneref::box_mask_loss_backward_cpu);
}
