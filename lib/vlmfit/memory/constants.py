"""Constants of the memory estimator, bytes unless named otherwise. Derivations in the
comments; the two marked "calibrated" were fitted to the H100 rows in docs/memory.md."""

from __future__ import annotations

GIB = 2**30

#: bytes per parameter of a weight by dtype.
DTYPE_BYTES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp32": 4}

#: NF4 with double quantization (bitsandbytes): 4 bits per weight, one 8-bit absmax per block
#: of 64 weights, one fp32 constant per 256 absmax values (plus a negligible offset).
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)

#: Optimizer states per trainable parameter, each of the parameter's dtype (LoRA adapters are
#: fp32: PEFT's ``autocast_adapter_dtype``; torch's AdamW keeps exp_avg and exp_avg_sq, so
#: bf16 full fine-tuning has 2 x 2 bytes).
OPTIMIZER_STATES: dict[str, int] = {"adamw": 2, "sgd": 0, "adamw8bit": 2}  # states per param

#: The loss over the vocabulary, bytes per vocabulary entry per token at its peak (start of
#: backward): logits in the model dtype (2), their fp32 upcast / log-softmax output (4), the
#: fp32 gradient of the log-probabilities (4) and of the logits (4). Calibrated: the
#: measured Qwen2.5-VL-7B slope (~2.6 MiB per token, 152k vocabulary) needs all four.
LOGITS_BYTES_PER_VOCAB = 14.0  # calibrated
#: Same with fp32 logits (fp32 lm_head, e.g. after prepare_model_for_kbit_training).
LOGITS_BYTES_PER_VOCAB_FP32 = 16.0

#: One decoder layer's activations saved for backward, bytes per token, as multiples of the
#: hidden size h, the attention width q (heads x head dim), the KV width kv and the MLP width
#: i; bf16 under autocast (transformers 5.23 Llama / Qwen2 decoder layers, SDPA). Exact on CPU
#: (``torch.autograd.graph.saved_tensors_hooks`` on one- and two-layer models, docs/memory.md).
#: Frozen linears save nothing (their weight gradient is not needed), so what is kept is:
#: each RMSNorm's fp32 copy of its input (``hidden.to(float32)``, kept by pow and mul) and
#: its fp32 reciprocal RMS (4 bytes a token).
LAYER_NORMS_H, LAYER_NORMS_TOKEN = 2 * 4.0, 2 * 4.0
#: SDPA: query and output (2q + 2q; the output is also o_proj's input, one storage), key and
#: value (2kv + 2kv), log-sum-exp (fp32, 4 per head).
LAYER_ATTN_Q, LAYER_ATTN_KV, LAYER_LSE_PER_HEAD = 4.0, 4.0, 4.0
#: With padding (several rows) transformers passes a mask, so SDPA cannot take GQA natively:
#: ``repeat_kv`` expands key and value to q width (saved), and the memory-efficient kernel
#: saves the mask as a bf16 bias [rows, 1, seq, seq]: 2 x seq bytes per token per layer.
LAYER_MASK_PER_SEQ = 2.0
#: The MLP: gate output (kept by SiLU), its SiLU and the up output (kept by their product).
LAYER_MLP_I = 6.0
#: Inputs kept for the LoRA matmuls (A needs its input), with the inputs shared: q/k/v read
#: one normed tensor, gate/up another (2h each), down reads the product (2i), o reads the
#: SDPA output (already counted). So it is with QLoRA (PEFT's 4-bit layer does not cast under
#: autocast), with ``fused_lora`` (one addmm on the layer's own bf16 input) and for full
#: fine-tuning (the trained weights keep the same inputs).
LORA_SHARED_H, LORA_SHARED_I = 2 * 2.0, 2.0
#: PEFT's bf16 LoRA layer (``fused_lora`` off) casts its input to the fp32 adapter dtype and
#: autocast casts it back to bf16 for A's matmul: each adapted linear keeps its own bf16
#: copy of its input: q, k, v, gate, up (5 x 2h), o (2q), down (2i).
LORA_COPIES_H, LORA_COPIES_Q, LORA_COPIES_I = 5 * 2.0, 2.0, 2.0
#: Without autocast A's matmul runs in fp32 on PEFT's fp32 copy, which it keeps: 2 x the bytes.
LORA_COPIES_NO_AUTOCAST = 2.0
#: LoRA dropout (PEFT's path) keeps a bool mask of each adapted input: 5h + q + i.
LORA_DROPOUT_H, LORA_DROPOUT_Q, LORA_DROPOUT_I = 5.0, 1.0, 1.0
#: Full fine-tuning: each RMSNorm's trained weight keeps its bf16 normalized input (2 x 2h).
FULL_FT_H = 2 * 2.0
#: Gradient checkpointing keeps each layer's bf16 input (2h per token per layer).
CHECKPOINT_H = 2.0
#: During the backward of a checkpointed layer, on top of its recomputed saved activations:
#: what is alive when the recomputation stops (the product feeding down, down's base output,
#: the residual, the incoming gradient): 2i + 8h. PEFT's bf16 LoRA adds the fp32 copy of
#: down's input it holds at that moment (4i). From CPU: 2b..7b within -1k..+9k bytes/token.
RECOMPUTE_EXTRA_H, RECOMPUTE_EXTRA_I, RECOMPUTE_PEFT_FP32_I = 8.0, 2.0, 4.0
#: Without checkpointing, the backward starts with every layer's activations kept; the
#: transient on top is the final RMSNorm's fp32 backward and the first gradients: 17-19h
#: per token on CPU (smolvlm-2b, qwen2-vl-2b, qwen2.5-vl-7b, a stand-in loss), more than
#: any one layer's backward adds there.
BACKWARD_EXTRA_H = 18.0
#: Outside the layers: the final RMSNorm's fp32 copy of its input (4h per token).
FINAL_NORM_H = 4.0
#: The DPO reference forward (no autograd, adapters off) while the policy's activations are
#: kept: one layer's transient (gate, up, SiLU, product: 8i; residual, norm: 8h).
REFERENCE_LAYER_H, REFERENCE_LAYER_I = 8.0, 8.0

#: TRL's ``activation_offloading`` moves what autograd keeps (with checkpointing: each
#: layer's input, saved by the checkpoint) to pinned CPU memory; the last
#: ``max_fwd_stash_size`` = 5 tensors stay on the GPU until the backward begins (the last
#: five layers' inputs). Measured: Qwen2.5-VL-7B LoRA mb 4, 6,869 tokens: 20.03 -> 18.96 GiB
#: (23 of 28 layer inputs off the GPU: 1.06 GiB predicted).
OFFLOAD_STASH_TENSORS = 5
#: vlmfit's own offloading (one process, ``vlmfit.train.offload``): a layer input leaves the
#: GPU as soon as its copy ends; in the backward one more is prefetched. Two layers' inputs.
OFFLOAD_LAYER_INPUTS = 2
#: Tokens/s with offloading relative to without, the planner's and the memory check's price
#: for the GiB it frees. vlmfit's own (one process): 1.0, Qwen2.5-VL-7B LoRA mb 4 end to end
#: on an H200, run 7: 6,012 / 5,963 tokens/s (with the input embeddings on the host too).
#: TRL's (several processes): 0.68, run 6: 4,091 / 5,998.
OFFLOAD_SPEED = 1.0
OFFLOAD_SPEED_TRL = 0.68
#: ``activation_offloading=None`` turns vlmfit's own offloading on where it is predicted to
#: lower the peak by at least this share (the 7B: 11%; SmolVLM, whose peak is the vision
#: tower's: under 2%, so off), and any offloading where the run fits no other way.
OFFLOAD_WORTH = 0.05

#: Vision block saved activations per patch (bf16) when autograd tracks the frozen tower (the
#: plain recipe), multiples of vision hidden vh / MLP vi: two norms (fp32 input, 4vh each),
#: attention (q, k, v, out: 8vh), MLP (gate out, its activation, up out: 6vi gated; fc1 out +
#: GELU: 4vi plain). Frozen linears save nothing.
VISION_LAYER_H, VISION_LAYER_I_GATED, VISION_LAYER_I_PLAIN = 16.0, 6.0, 4.0
#: The frozen vision tower's forward without autograd (vlmfit's default), peak bytes per patch:
#: the residual and the norm's output and temporaries (6vh), the MLP's intermediates
#: (fc1 + GELU-tanh: 4vi; QuickGELU's temporaries: 6vi; gated SiLU: 8vi) and the pixels (the
#: batch's bf16 pixel values, the processor's copies: 9 bytes per pixel of a patch).
VISION_NOGRAD_H, VISION_NOGRAD_PIXEL = 6.0, 9.0
#: The chunked tiled tower (``RunConfig.vision_chunk``): the transient of one pass of N tiles,
#: plus the outputs of every tile, two bf16 copies while they are joined (bytes / hidden unit).
VISION_CHUNK_OUT_H = 4.0
#: ``RunConfig.vision_chunk``'s default (tiles a pass), what ``recipe="vlmfit"`` predicts.
VISION_CHUNK_TILES = 32
VISION_NOGRAD_I = {"gelu_tanh": 4.0, "quick_gelu": 6.0, "gated": 8.0}
#: LayerNorm towers (SigLIP, Qwen2-VL) under CUDA autocast: layer_norm runs in fp32, its
#: output is fp32 (+2vh). Measured on CPU with CUDA's fp32 layer_norm, bytes per patch (+ the
#: batch's pixels): smolvlm 23.1k, smolvlm-2b 31.0k, qwen2-vl-2b 49.4k, qwen2.5-vl-3b 46.8k;
#: predicted 25.3k, 31.7k, 51.5k, 45.6k. On the H200 SmolVLM-256M mb 4 (vision peak) measured
#: 2.36 GiB with autocast, 2.26 without: the 2vh per patch.
VISION_AUTOCAST_LN_H = 2.0
#: A 4-bit LayerNorm tower under autocast: bitsandbytes' Linear4bit returns its input's dtype,
#: so after the fp32 LayerNorm the linears, the activation and the residual stream stay fp32:
#: 1.5 x the vh term, 2 x the vi term. Measured on CPU: smolvlm 37.0k, smolvlm-2b 51.7k,
#: qwen2-vl-2b 77.7k bytes per patch (+ pixels); Qwen2.5-VL's RMSNorm returns bf16.
VISION_FP32_H, VISION_FP32_I = 1.5, 2.0

#: Memory allocated outside the model's tensors during a step (cuBLAS / cuDNN workspaces,
#: the batch, rotary tables, small buffers), GiB. Calibrated (small).
ALLOC_OVERHEAD_GIB = 0.1  # calibrated
#: CUDA context + kernels loaded by torch (not counted by max_memory_allocated), GiB.
CUDA_CONTEXT_GIB = 0.6
#: Reserved / allocated: caching-allocator fragmentation (measured 34.1 / 29.5 at 2000 px).
FRAGMENTATION = 0.10

#: TRL's fused LM head (``trl.kernels.chunked_logprob``, on CUDA): only the scored positions
#: (labels != -100: the answer in SFT, the completions in DPO) are projected, in [4096 tokens
#: x 32768 vocabulary] bf16 tiles folded in place by a Triton kernel (2 bytes per element).
#: It keeps the scored hidden states (2h each); its backward accumulates their gradient in
#: fp32 (4h) and casts it (2h), and scatters it into the sequence (2h per token, twice: the
#: mask and the shift). A trained lm_head adds its fp32 gradient accumulator (4 x vocab x h).
FUSED_TILE_TOKENS, FUSED_TILE_VOCAB, FUSED_TILE_BYTES = 4096, 32768, 2.0
FUSED_SCORED_H, FUSED_GRAD_SCORED_H, FUSED_GRAD_TOKEN_H = 2.0, 6.0, 4.0

#: QLoRA is the least validated estimate (docs/memory.md): ``plan`` adds this to its margin.
QLORA_UNCERTAINTY = 0.10

#: Engines of several GPUs (accelerate/*.yaml).
ENGINES = ("ddp", "fsdp2", "zero3")

#: What ``estimate`` can predict: vlmfit's default path, or the textbook recipe.
RECIPES = ("vlmfit", "plain")

#: Relative speed of a step per token (1 = bf16 LoRA without checkpointing), for ranking.
SPEED = {"gc": 0.75, "qlora": 0.59, "full": 0.9}
#: Tokens/s gained by micro-batch mb over mb 1: 1 + MB_GAIN x (1 - 1/mb). Measured on the
#: fast path (H200, Qwen2.5-VL-7B LoRA: 3,017 -> 4,203 tokens/s from mb 1 to 4); QLoRA's
#: 0.59 is 1,778 / 3,017 tokens/s at mb 1 (docs/benchmarks.md).
MB_GAIN = 0.52
