// The fastkd:: operator schemas, declared once for every backend. Each
// csrc/cpu/*.cpp and csrc/cuda/*_ops.cpp registers its own implementation;
// fake (meta) implementations and autograd live in fastkd/_ops.py.
// Signatures and the row-weight convention: docs/design.md.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fastkd, m) {
  m.def(
      "kd_fwd(Tensor student, Tensor teacher, Tensor temperature, Tensor row_weight, bool reduce, "
      "bool grad_student, bool grad_teacher, bool grad_temperature) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "ats_fwd(Tensor student, Tensor teacher, Tensor target, Tensor row_weight, float student_temperature, "
      "float target_temperature, float other_temperature, bool reduce, bool grad_student, bool grad_teacher) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "dkd_fwd(Tensor student, Tensor teacher, Tensor target, Tensor row_weight, float alpha, float beta, "
      "float temperature, bool reduce, bool grad_student, bool grad_teacher) -> (Tensor, Tensor, Tensor)");
  m.def(
      "dist_fwd(Tensor student, Tensor teacher, float beta, float gamma, float temperature, bool grad_student, "
      "bool grad_teacher) -> (Tensor, Tensor, Tensor)");
  m.def("mgd_mask(Tensor x, int seed, float mask_ratio, bool spatial) -> Tensor");
  m.def(
      "mgd_sq_err(Tensor pred, Tensor teacher, float scale, bool grad_pred, bool grad_teacher) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "divergence_fwd(Tensor student, Tensor teacher, Tensor topk_ids, Tensor target, Tensor row_weight, "
      "float temperature, int kind, float a, float b, float w_p, float w_q, float soft_scale, float ce_weight, "
      "int topk_mode, bool reduce, bool grad_student, bool grad_teacher, float teacher_temperature=0.0) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // adaptive KL (csrc/cpu/akl.cpp, csrc/cuda/akl.cu): divergence_fwd's schema, a = mu, kind 8, dense teachers
  m.def(
      "akl_fwd(Tensor student, Tensor teacher, Tensor topk_ids, Tensor target, Tensor row_weight, "
      "float temperature, int kind, float a, float b, float w_p, float w_q, float soft_scale, float ce_weight, "
      "int topk_mode, bool reduce, bool grad_student, bool grad_teacher, float teacher_temperature=0.0) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // the teacher's top-k of each row (csrc/cpu/topk.cpp, fastkd/teacher/topk.py): ids, log-probs, tail, (max, log z)
  m.def("topk_fwd(Tensor logits, int k, float temperature) -> (Tensor, Tensor, Tensor, Tensor)");
  // ULD across vocabularies (csrc/cpu/uld.cpp, fastkd/losses/cross_tokenizer.py): student [N, V_s], teacher [N, V_t]
  m.def(
      "uld_fwd(Tensor student, Tensor teacher, Tensor target, Tensor row_weight, float temperature, "
      "float teacher_temperature, float ce_weight, bool reduce, bool grad_student, bool grad_teacher, "
      "bool log_probs=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // the row passes of the vocabulary-parallel divergences (csrc/cpu/divergence_shard.cpp, fastkd/distributed.py)
  m.def("divergence_shard_stats(Tensor student, Tensor teacher, float temperature, bool ce, Tensor row_read) -> Tensor");
  m.def(
      "divergence_shard_terms(Tensor student, Tensor teacher, Tensor row_stats, float temperature, int kind, "
      "float a, float b, float w_p, float w_q, Tensor row_read, Tensor row_direct, Tensor row_target, "
      "Tensor(a!) g, Tensor(b!) h) -> Tensor");
  m.def(
      "divergence_shard_grad(Tensor student, Tensor teacher, Tensor row_stats, float temperature, int kind, "
      "float a, float b, float w_p, float w_q, Tensor row_coef, Tensor row_read, Tensor row_target, "
      "Tensor(a!) g, Tensor(b!) h) -> ()");
}

// `import fastkd._C` loads this library, whose static initialisers register the ops.
static struct PyModuleDef fastkd_c_module = {PyModuleDef_HEAD_INIT, "_C", "fastkd compiled kernels", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastkd_c_module); }
