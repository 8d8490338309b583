"""THE ordered list of graph passes the builder runs. Read top to bottom.

The builder runs it with PassManager(default_pipeline(), subgraphs=True): each pass also rewrites every
If / Loop / Scan body (recursively), behind the body's fixed interface (kiln.passes.base)."""
from __future__ import annotations

from kiln.passes.attention import FuseAttention
from kiln.passes.base import Fixpoint, Pass
from kiln.passes.batchnorm import BatchNormToScale, FoldBatchNorm
from kiln.passes.cast import SinkIntCasts
from kiln.passes.concat import JoinSplitRuns, MarkConcatElision, NestConcats
from kiln.passes.conv_fusion import FuseConv
from kiln.passes.conv_norm import FuseConvNorm
from kiln.passes.cse import EliminateCommonSubexpressions
from kiln.passes.dce import DeadCodeElimination
from kiln.passes.donate import DonateResidual
from kiln.passes.eliminate import EliminateNoOps
from kiln.passes.fold import FoldConstants
from kiln.passes.gemm_fusion import FoldRowAffineIntoGemm, FuseGemm, HoistActivationAboveReshape
from kiln.passes.hoist import HoistLoopInvariants
from kiln.passes.horizontal import FuseSiblingConvs, FuseSiblingGemms, SplitColumnsToViews
from kiln.passes.pad import FoldPad
from kiln.passes.pointwise import FusePointwise
from kiln.passes.quantize import FoldWeightDequantize
from kiln.passes.recognise import (RecogniseChannelShuffle, RecogniseGelu, RecogniseHardSwish, RecogniseLayerNorm,
                                   RecogniseGroupNorm, RecogniseRMSNorm)
from kiln.passes.residual_norm import FuseResidualNorm
from kiln.passes.scale import CommuteAffineThroughRelu, FoldScale
from kiln.passes.shape_inference import InferTypes
from kiln.passes.shapes import SimplifyShapes
from kiln.passes.summed_convs import MergeSummedConvs
from kiln.passes.squeeze_excite import FuseSqueezeExcite


def default_pipeline() -> list[Pass]:
    return [
        # a Q/DQ model's weights: int8 constants -> float constants that remember their scales (kiln.quant.build
        # turns the Q/DQ nodes around conv/gemm layers into integer layers after this pipeline)
        FoldWeightDequantize(),
        # folding, type inference and reshape targets feed each other: a folded shape input types the
        # layers after it, and a Reshape whose run-time target copies its input's dims (SimplifyShapes)
        # types its output, whose Shape chains then fold (a channel shuffle after a dynamic batch)
        # (one round per such Reshape in a chain of them: ShuffleNet's 16 blocks need 17 rounds)
        Fixpoint("simplify", [FoldConstants(), DeadCodeElimination(), InferTypes(), SimplifyShapes()], max_iters=64),
        # cleanup: no-ops and shape-op chains (so that producers and consumers meet), work done twice
        Fixpoint("eliminate", [EliminateNoOps(), SimplifyShapes(), EliminateCommonSubexpressions(),
                               DeadCodeElimination()]),
        # loop bodies: work that reads only outer values and constants runs once, before the loop
        HoistLoopInvariants(),
        InferTypes(),  # shapes folded to constants now: symbolic dims and types reach more values
        # exporters' decompositions back to single ops: GELU and HardSwish become gemm/conv epilogues, LayerNorm and RMSNorm one
        # kernel, a channel shuffle (Reshape / Transpose / Reshape) one copy into the channels-last layout
        RecogniseGelu(),
        RecogniseHardSwish(),
        RecogniseLayerNorm(),
        RecogniseRMSNorm(),
        RecogniseGroupNorm(),
        RecogniseChannelShuffle(),
        # scaled dot-product attention (MatMul / scale / mask / Softmax / MatMul, heads split and merged) -> one
        # Attention layer, before its MatMuls fuse into gemms and its mask Add into a pointwise program
        FuseAttention(),
        # weight folding into convolutions / gemms, while they are still plain ONNX ops
        FoldBatchNorm(),
        BatchNormToScale(),
        CommuteAffineThroughRelu(),  # Relu(y) * s + t -> Clip(y * s + t, min=t): the affine then folds too
        FoldScale(),
        FoldPad(),  # after the affine folds: a zero Pad of Clip(min >= 0) then folds into a MaxPool too
        # Add of convolutions of one input (RepVGG / MobileOne branches) -> one convolution; a constant added to the
        # sum then folds into its bias
        Fixpoint("summed convs", [MergeSummedConvs(), FoldScale()]),
        # layer fusion: conv / gemm epilogues, squeeze-excite gates, sibling 1x1 convs, leftover elementwise chains
        FuseConv(),
        FoldRowAffineIntoGemm(),  # GEMM -> Reshape -> per-column Mul / Add (LeViT's BatchNorm1d): into the GEMM
        HoistActivationAboveReshape(),  # GEMM -> Reshape -> activation: the activation first
        FuseGemm(),
        FuseSqueezeExcite(),  # pool + the two 1x1 convs of a squeeze-excite gate -> one SEGate
        FuseSiblingConvs(),
        FuseSiblingGemms(),  # Q, K, V projections of one input -> one gemm, column views
        SplitColumnsToViews(),  # a Split of the last axis -> Slice views (a packed projection's parts)
        FuseResidualNorm(),  # CUDA: a residual add (gemm epilogue or Add) into the LayerNorm / RMSNorm after it
        FuseConvNorm(),  # CUDA: a depthwise conv and the channels-last LayerNorm after it -> one layer (ConvNeXt)
        SinkIntCasts(),  # CUDA: an integer -> bool / float32 Cast below Reshapes / Gathers, into the program after
        FusePointwise(),
        JoinSplitRuns(),  # Concat(Split(y)..) reads y whole: YOLO's C2f / C3k2 halves stay views of one buffer
        Fixpoint("cleanup", [EliminateNoOps(), DeadCodeElimination()]),
        NestConcats(),  # Concat(x0..x5) after Concat(x0..x4) reads it: DenseNet's block becomes one buffer
        MarkConcatElision(),
        DonateResidual(),
    ]
