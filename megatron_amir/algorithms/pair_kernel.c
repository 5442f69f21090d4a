/* AMIR pair statistics for one rank's rows, in one pass over every group's (winner, loser) grid.
 *
 * Built on first use by megatron_amir/algorithms/native.py (plain C99, no torch headers): as a CPython
 * extension where Python's headers are installed (the wrapper at the end, -DAMIR_PYTHON_EXT), else as a
 * plain library called through ctypes. Called from amir.pair_kernel_call (by pair_statistics and by
 * prepare_batch). The torch implementation in amir.py is the reference and the fallback; tests check all
 * three against a float64 loop.
 *
 * Inputs (host memory, C-contiguous): rewards r[n] (double); group index gidx[n] in [0, b); valid[n]
 * (bool bytes); implicit-reward log-probs s[n] (float or double, multiplied by beta); optional lengths
 * len[n] (float or double, may be NULL).
 * A pair (w, l) is two valid rows of one group with r_w - r_l > margin; with top_only, w must also be
 * its group's best valid row (the first one in row order on ties). For d = s_w - s_l:
 *   sums[0] = P,  sums[1] = sum -log sigmoid(d),  sums[2] = #(d > 0),  sums[3] = sum d   (double),
 *   rows[i] = c_i = sum_{(w,i)} sigmoid(-d) - sum_{(i,l)} sigmoid(-d)   (losers +, winners -),
 *   rows[n + i] = c_i / max(len_i, 1)                                    (only when len != NULL),
 * everything accumulated in double; rows stored as float or double (rows_is_f32).
 * Returns 0, or -1 when a group index is out of range, -2 when memory runs out.
 */
#ifdef AMIR_PYTHON_EXT
#define PY_SSIZE_T_CLEAN
#include <Python.h> /* first, as Python requires (it sets feature macros); see the wrapper at the end */
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

static double load(const void *p, int is_f32, int64_t i) {
  return is_f32 ? (double)((const float *)p)[i] : ((const double *)p)[i];
}

static void store(void *p, int is_f32, int64_t i, double v) {
  if (is_f32) ((float *)p)[i] = (float)v; else ((double *)p)[i] = v;
}

int amir_pair_stats(int64_t n, int64_t b, const int64_t *gidx, const double *r, const uint8_t *valid,
                    const void *s, int s_is_f32, double beta, const void *len, int len_is_f32,
                    double margin, int top_only, double *sums, void *rows_out, int rows_is_f32) {
  double num = 0.0, nll = 0.0, correct = 0.0, dsum = 0.0;
  if (n > 0 && b <= 0) return -1;
  double *coef = calloc((size_t)n + 1, sizeof(double));
  if (!coef) return -2;
  /* rows of each group in row order: a counting sort on the group index */
  int64_t *start = calloc((size_t)b + 1, sizeof(int64_t));
  int64_t *rows = malloc(((size_t)n + 1) * sizeof(int64_t));
  int64_t *fill = malloc(((size_t)b + 1) * sizeof(int64_t));
  if (!start || !rows || !fill) { free(start); free(rows); free(fill); free(coef); return -2; }
  for (int64_t i = 0; i < n; i++) {
    if (gidx[i] < 0 || gidx[i] >= b) { free(start); free(rows); free(fill); free(coef); return -1; }
    start[gidx[i] + 1]++;
  }
  for (int64_t k = 0; k < b; k++) start[k + 1] += start[k];
  for (int64_t k = 0; k < b; k++) fill[k] = start[k];
  for (int64_t i = 0; i < n; i++) rows[fill[gidx[i]]++] = i;

  for (int64_t k = 0; k < b; k++) {
    const int64_t *g = rows + start[k];
    const int64_t m = start[k + 1] - start[k];
    int64_t top = -1;
    if (top_only) {
      for (int64_t j = 0; j < m; j++)
        if (valid[g[j]] && (top < 0 || r[g[j]] > r[top])) top = g[j];
    }
    for (int64_t a = 0; a < m; a++) {
      const int64_t w = g[a];
      if (!valid[w] || (top_only && w != top)) continue;
      const double sw = beta * load(s, s_is_f32, w);
      for (int64_t c = 0; c < m; c++) {
        const int64_t l = g[c];
        if (!valid[l] || !(r[w] - r[l] > margin)) continue; /* NaN rewards never form a pair */
        const double d = sw - beta * load(s, s_is_f32, l);
        const double e = exp(-fabs(d));                        /* no overflow for any d */
        nll += log1p(e) + (d < 0.0 ? -d : 0.0);                /* -log sigmoid(d) = softplus(-d) */
        const double sig_neg = d > 0.0 ? e / (1.0 + e) : 1.0 / (1.0 + e); /* sigmoid(-d) */
        num += 1.0;
        correct += d > 0.0;
        dsum += d;
        coef[l] += sig_neg;
        coef[w] -= sig_neg;
      }
    }
  }
  free(start);
  free(rows);
  free(fill);
  sums[0] = num;
  sums[1] = nll;
  sums[2] = correct;
  sums[3] = dsum;
  for (int64_t i = 0; i < n; i++) store(rows_out, rows_is_f32, i, coef[i]);
  if (len) {
    for (int64_t i = 0; i < n; i++) {
      const double li = load(len, len_is_f32, i);
      store(rows_out, rows_is_f32, n + i, coef[i] / (li > 1.0 ? li : 1.0));
    }
  }
  free(coef);
  return 0;
}

#ifdef AMIR_PYTHON_EXT
/* The same function as a CPython extension (built when Python's headers are present; native.py falls back
 * to ctypes otherwise): a METH_FASTCALL call skips ctypes' per-argument conversion and libffi, about 13 us
 * of the pair term's in-place cost (docs/benchmarks.md). Arguments as for amir_pair_stats, pointers as
 * ints (tensor.data_ptr()), NULL as None; returns its int. The GIL is kept: the call takes microseconds. */
static void *as_ptr(PyObject *o) { return o == Py_None ? NULL : PyLong_AsVoidPtr(o); }

static PyObject *py_pair_stats(PyObject *self, PyObject *const *a, Py_ssize_t na) {
  (void)self;
  if (na != 15) {
    PyErr_Format(PyExc_TypeError, "amir_pair_stats takes 15 arguments (%zd given)", na);
    return NULL;
  }
  const int64_t n = PyLong_AsLongLong(a[0]), b = PyLong_AsLongLong(a[1]);
  void *gidx = as_ptr(a[2]), *r = as_ptr(a[3]), *valid = as_ptr(a[4]), *s = as_ptr(a[5]);
  const int s_f32 = PyObject_IsTrue(a[6]);
  const double beta = PyFloat_AsDouble(a[7]);
  void *len = as_ptr(a[8]);
  const int len_f32 = PyObject_IsTrue(a[9]);
  const double margin = PyFloat_AsDouble(a[10]);
  const int top = PyObject_IsTrue(a[11]);
  void *sums = as_ptr(a[12]), *rows = as_ptr(a[13]);
  const int rows_f32 = PyObject_IsTrue(a[14]);
  if (PyErr_Occurred()) return NULL;
  return PyLong_FromLong(amir_pair_stats(n, b, gidx, r, valid, s, s_f32, beta, len, len_f32, margin, top,
                                         sums, rows, rows_f32));
}

static PyMethodDef methods[] = {
    {"amir_pair_stats", (PyCFunction)(void (*)(void))py_pair_stats, METH_FASTCALL, "AMIR pair statistics"},
    {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_amir_pair_ext", NULL, -1, methods, NULL, NULL, NULL, NULL};
PyMODINIT_FUNC PyInit__amir_pair_ext(void) { return PyModule_Create(&module); }
#endif
