/* What a layer is made of, in one table: the tensor names a model file gives
 * (GGUF's, without ".weight"), their shapes in terms of the config, where
 * each goes in dl_layer, and the projections a LoRA adapter can target.
 * The binding (csrc/py/weights.c), the model's allocation and byte count
 * (model.c), LoRA (ops/lora.c) and the Python readers (deelm.io.layout,
 * deelm.io.hf, deelm.adapters.lora, through _core.layer_schema) all read it. */
#include <stddef.h>

#include "deelm.h"

static const char *const width_names[DL_N_WIDTHS] = {
    [DL_W_ONE] = "1", [DL_W_D] = "d", [DL_W_F] = "f", [DL_W_HD] = "hd",
    [DL_W_DQ] = "dq", [DL_W_DKV] = "dkv", [DL_W_VOCAB] = "vocab",
};

const char *dl_width_name(int w) { return w >= 0 && w < DL_N_WIDTHS ? width_names[w] : "?"; }

int64_t dl_width(const dl_config *c, int w) {
    switch (w) {
    case DL_W_D: return c->dim;
    case DL_W_F: return c->hidden_dim;
    case DL_W_HD: return c->head_dim;
    case DL_W_DQ: return c->n_heads * c->head_dim;
    case DL_W_DKV: return c->n_kv_heads * c->head_dim;
    case DL_W_VOCAB: return c->vocab_size;
    default: return 1;
    }
}

/* In module order: a fused layer's rows are its modules' outputs stacked in
 * this order (q, k, v; gate, up). */
const dl_module_spec dl_modules[DL_N_MODULES] = {
    [DL_MOD_Q] = {"q_proj", "attn_q", DL_W_D, DL_W_DQ, DL_FUSED_QKV},
    [DL_MOD_K] = {"k_proj", "attn_k", DL_W_D, DL_W_DKV, DL_FUSED_QKV},
    [DL_MOD_V] = {"v_proj", "attn_v", DL_W_D, DL_W_DKV, DL_FUSED_QKV},
    [DL_MOD_O] = {"o_proj", "attn_output", DL_W_DQ, DL_W_D, DL_FUSED_O},
    [DL_MOD_GATE] = {"gate_proj", "ffn_gate", DL_W_D, DL_W_F, DL_FUSED_GATE_UP},
    [DL_MOD_UP] = {"up_proj", "ffn_up", DL_W_D, DL_W_F, DL_FUSED_GATE_UP},
    [DL_MOD_DOWN] = {"down_proj", "ffn_down", DL_W_F, DL_W_D, DL_FUSED_DOWN},
};

const size_t dl_fused_field[DL_N_FUSED] = {
    [DL_FUSED_QKV] = offsetof(dl_layer, wqkv), [DL_FUSED_O] = offsetof(dl_layer, wo),
    [DL_FUSED_GATE_UP] = offsetof(dl_layer, wgate_up), [DL_FUSED_DOWN] = offsetof(dl_layer, wdown),
};

#define VEC(name, feature, width, field) {name, feature, width, -1, offsetof(dl_layer, field)}
#define LIN(module) {NULL, DL_FEAT_BASE, 0, module, 0}
#define BIAS(name, module) {name, DL_FEAT_QKV_BIAS, 0, module, offsetof(dl_layer, bqkv)}

/* A layer's tensors in file order: LLaMA's block, then Gemma-3's q/k head
 * norms and post-norms, then the optional q/k/v biases (Qwen2). */
const dl_tensor_spec dl_layer_tensors[DL_N_LAYER_TENSORS] = {
    VEC("attn_norm", DL_FEAT_BASE, DL_W_D, attn_norm),
    LIN(DL_MOD_Q), LIN(DL_MOD_K), LIN(DL_MOD_V), LIN(DL_MOD_O),
    VEC("ffn_norm", DL_FEAT_BASE, DL_W_D, ffn_norm),
    LIN(DL_MOD_GATE), LIN(DL_MOD_UP), LIN(DL_MOD_DOWN),
    VEC("attn_q_norm", DL_FEAT_QK_NORM, DL_W_HD, q_norm),
    VEC("attn_k_norm", DL_FEAT_QK_NORM, DL_W_HD, k_norm),
    VEC("post_attention_norm", DL_FEAT_POST_NORMS, DL_W_D, post_attn_norm),
    VEC("post_ffw_norm", DL_FEAT_POST_NORMS, DL_W_D, post_ffn_norm),
    BIAS("attn_q.bias", DL_MOD_Q), BIAS("attn_k.bias", DL_MOD_K), BIAS("attn_v.bias", DL_MOD_V),
};

const char *dl_tensor_name(const dl_tensor_spec *t) {
    return t->name ? t->name : dl_modules[t->module].tensor;
}

void dl_tensor_shape(const dl_config *c, const dl_tensor_spec *t, int64_t *cols, int64_t *rows) {
    if (t->module >= 0 && t->feature == DL_FEAT_BASE) {
        *cols = dl_width(c, dl_modules[t->module].in);
        *rows = dl_width(c, dl_modules[t->module].out);
    } else {
        *cols = dl_width(c, t->module >= 0 ? dl_modules[t->module].out : t->width);
        *rows = 1;
    }
}

int dl_feature_on(const dl_config *c, int feature, int qkv_bias) {
    switch (feature) {
    case DL_FEAT_QK_NORM: return c->qk_norm;
    case DL_FEAT_POST_NORMS: return c->post_norms;
    case DL_FEAT_QKV_BIAS: return qkv_bias;
    default: return 1;
    }
}

int dl_module_fused(int module) { return dl_modules[module].fused; }

int64_t dl_module_row0(const dl_config *c, int module) {
    int64_t row0 = 0;
    for (int m = 0; m < module; m++)
        if (dl_modules[m].fused == dl_modules[module].fused) row0 += dl_width(c, dl_modules[m].out);
    return row0;
}

int64_t dl_fused_rows(const dl_config *c, int fused) {
    int64_t rows = 0;
    for (int m = 0; m < DL_N_MODULES; m++)
        if (dl_modules[m].fused == fused) rows += dl_width(c, dl_modules[m].out);
    return rows;
}

int64_t dl_fused_cols(const dl_config *c, int fused) {
    for (int m = 0; m < DL_N_MODULES; m++)
        if (dl_modules[m].fused == fused) return dl_width(c, dl_modules[m].in);
    return 0;
}
