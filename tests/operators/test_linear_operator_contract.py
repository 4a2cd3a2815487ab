"""linear_operator's own contract (``LinearOperatorTestCase``) on ``StateNTK`` and its dual.

The reference for every check is the dense matrix of the same operator
(:func:`lanczos_ntk.testing.dense_operator`). The sNTK here is ``18 × 18`` of rank 15 (``M > P``),
so the checks that need a nonsingular matrix — solves, log-determinants, Cholesky,
eigenvectors of the null space — fail on it for linear_operator's own dense operator too (or
pass there by rounding luck: ``torch.linalg.cholesky`` of the dense rank-15 matrix succeeds or
not depending on the last bits of its tiny trailing minors): they are
properties of the matrix, not of this implementation, and run on the dual ``G`` (``15 × 15``,
nonsingular, from four trials of five steps) instead, except the three that fail for the
dense ``G`` as well (its condition number is about 3e7). The one refusal by design is half
precision. Counts (61 checks each): ``StateNTK`` 41 pass, 19 are properties of its singular
matrix (failing for the dense operator too), 1 refused; ``DualNTK`` 57 pass, 3 properties of
its conditioning, 1 refused.
"""

import pickle
import unittest

import pytest
import torch
from linear_operator.test.linear_operator_test_case import LinearOperatorTestCase

import lanczos_ntk as lnk
from lanczos_ntk.testing import dense_operator

pytestmark = pytest.mark.filterwarnings(
    "ignore::linear_operator.utils.warnings.PerformanceWarning",
    "ignore::linear_operator.utils.warnings.NumericalWarning",
    "ignore:Sparse invariant checks:UserWarning",
)  # torch, inside linear_operator's indexing


def _kernel(trials=2, steps=3):
    model = lnk.models.CTRNN(3, 1, seed=0).double()
    u = torch.randn(trials, steps, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return lnk.StateNTK(model, u)


class _Contract(LinearOperatorTestCase):
    seed = 0

    def setUp(self):
        self._default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)  # the contract draws right-hand sides in it
        super().setUp()

    def tearDown(self):
        torch.set_default_dtype(self._default)

    def evaluate_linear_op(self, op):
        return dense_operator(op)

    def test_half(self):
        with self.assertRaisesRegex(TypeError, "half precision"):
            self.create_linear_op().half()


class TestStateNTKContract(_Contract, unittest.TestCase):
    def create_linear_op(self):
        return _kernel()


# a singular matrix: these fail on linear_operator's dense operator of the same K as well
for _name in (
    "test_add_low_rank",
    "test_cat_rows",
    "test_cholesky",
    "test_eigh",
    "test_eigvalsh",
    "test_inv_quad_logdet",
    "test_inv_quad_logdet_no_reduce",
    "test_inv_quad_logdet_no_reduce_cholesky",
    "test_root_decomposition_cholesky",
    "test_solve_matrix",
    "test_solve_matrix_broadcast",
    "test_solve_matrix_cholesky",
    "test_solve_matrix_with_left",
    "test_solve_vector",
    "test_solve_vector_with_left",
    "test_solve_vector_with_left_cholesky",
    "test_sqrt_inv_matmul",
    "test_sqrt_inv_matmul_no_lhs",
    "test_svd",
):
    setattr(TestStateNTKContract, _name, None)


class TestDualNTKContract(_Contract, unittest.TestCase):
    def create_linear_op(self):
        # four trials of five steps: G (15 × 15) has condition number about 3e7; the two trials
        # of three steps of the primal kernel give about 2e13, where whether a solve passes the
        # contract's tolerances depends on the processor's rounding
        return _kernel(trials=4, steps=5).dual()


# G is nonsingular but ill-conditioned: these fail on linear_operator's dense operator of the
# same G as well
for _name in ("test_cat_rows", "test_sqrt_inv_matmul", "test_sqrt_inv_matmul_no_lhs"):
    setattr(TestDualNTKContract, _name, None)


def test_batch_views_share_one_pass_and_keep_their_shape():
    K = _kernel()
    D = dense_operator(K)
    X = torch.randn(3, 18, 2, dtype=torch.float64)
    before = K.num_matvecs
    torch.testing.assert_close(K.matmul(X), D @ X)
    assert K.num_matvecs - before == 6  # one block of 3·2 columns
    E = K.expand(4, 18, 18)
    assert E.shape == (4, 18, 18)
    torch.testing.assert_close(E.to_dense(), D.expand(4, 18, 18))
    assert K.unsqueeze(0).shape == (1, 18, 18)


def test_diagonal_indices_pickle_and_dtype_without_dense_products():
    K = _kernel()
    D = dense_operator(K)
    torch.testing.assert_close(K.diagonal(), torch.diagonal(D))
    torch.testing.assert_close(K.dual().diagonal(), torch.diagonal(dense_operator(K.dual())))
    i, j = torch.tensor([0, 5, 17]), torch.tensor([3, 3, 9])
    torch.testing.assert_close(K[i, j], D[i, j])
    back = pickle.loads(pickle.dumps(K))
    torch.testing.assert_close(dense_operator(back), D)
    K32 = K.float()
    assert K32.dtype == torch.float32
    torch.testing.assert_close(dense_operator(K32).double(), D, rtol=1e-4, atol=1e-6)
