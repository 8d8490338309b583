"""THE ordered list of graph passes the builder runs. Read top to bottom."""
from __future__ import annotations

from kiln.passes.base import Fixpoint, Pass
from kiln.passes.batchnorm import BatchNormToScale, FoldBatchNorm
from kiln.passes.concat import MarkConcatElision
from kiln.passes.conv_fusion import FuseConv
from kiln.passes.dce import DeadCodeElimination
from kiln.passes.donate import DonateResidual
from kiln.passes.eliminate import EliminateNoOps
from kiln.passes.fold import FoldConstants
from kiln.passes.gemm_fusion import FuseGemm
from kiln.passes.horizontal import FuseSiblingConvs
from kiln.passes.pad import FoldPad
from kiln.passes.pointwise import FusePointwise
from kiln.passes.scale import FoldScale
from kiln.passes.shape_inference import InferTypes
from kiln.passes.shapes import SimplifyShapes


def default_pipeline() -> list[Pass]:
    return [
        # folding and type inference feed each other: a folded shape input types the layers after it
        Fixpoint("simplify", [FoldConstants(), DeadCodeElimination(), InferTypes()]),
        # cleanup: no-ops and shape-op chains (so that producers and consumers meet)
        Fixpoint("eliminate", [EliminateNoOps(), SimplifyShapes(), DeadCodeElimination()]),
        InferTypes(),  # shapes folded to constants now: symbolic dims and types reach more values
        # weight folding into convolutions / gemms, while they are still plain ONNX ops
        FoldBatchNorm(),
        BatchNormToScale(),
        FoldPad(),
        FoldScale(),
        # layer fusion: conv / gemm epilogues, sibling 1x1 convs, then leftover elementwise chains
        FuseConv(),
        FuseGemm(),
        FuseSiblingConvs(),
        FusePointwise(),
        Fixpoint("cleanup", [EliminateNoOps(), DeadCodeElimination()]),
        MarkConcatElision(),
        DonateResidual(),
    ]
