"""Detection post-processing appended to an imported YOLO network: decode every head, then NMS, in the plan.

    graph = load_darknet("yolov4-tiny.cfg", "yolov4-tiny.weights")
    append_detection(graph, parse_darknet_cfg("yolov4-tiny.cfg").heads, conf=0.25, iou=0.45, max_det=100)

The raw head outputs (`yolo<index>`) are replaced by the four fixed-size outputs of the built-in BatchedNMS
plugin: num_detections [N, 1] int32, det_boxes [N, K, 4] (x1, y1, x2, y2), det_scores [N, K] and det_classes
[N, K] int32, K = max_det. Each head is decoded by a YoloDecode node with its own anchors and scale_x_y; the
boxes and scores of all heads are joined by a Concat before the NMS. With `letterbox=True` the graph takes
a second input, `letterbox` [N, 4] float32 = (scale_x, scale_y, pad_x, pad_y) per image: the boxes come out
in the original image's pixels, x = (x_network - pad_x) / scale_x (see kiln.plugins.detection); without
it they are in network-input pixels.
"""
from __future__ import annotations

import math
from typing import Sequence

from kiln.errors import KilnError
from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Value

__all__ = ["DETECTION_OUTPUTS", "LETTERBOX_INPUT", "append_detection", "check_detect_options"]

DETECTION_OUTPUTS = ("num_detections", "det_boxes", "det_scores", "det_classes")
LETTERBOX_INPUT = "letterbox"
MAX_DETECTIONS = 1 << 16      # BatchedNMS's max_output_boxes limit
DEFAULT_PRE_NMS_TOP_K = 4096  # candidates ranked per image before the greedy pass (BatchedNMS's default)


def check_detect_options(conf: float, iou: float, max_det: int, pre_nms_top_k: int = DEFAULT_PRE_NMS_TOP_K) -> None:
    """KilnError (one line) unless 0 <= conf < 1, 0 <= iou <= 1, 1 <= max_det <= 65536 and
    1 <= pre_nms_top_k <= 65536: the options' names are those of `kiln build --detect`."""
    if not (isinstance(conf, (int, float)) and math.isfinite(conf) and 0.0 <= conf < 1.0):
        raise KilnError(f"--conf must be a score threshold in [0, 1), got {conf}")
    if not (isinstance(iou, (int, float)) and math.isfinite(iou) and 0.0 <= iou <= 1.0):
        raise KilnError(f"--iou must be an IoU threshold in [0, 1], got {iou}")
    for flag, v in (("--max-det", max_det), ("pre_nms_top_k", pre_nms_top_k)):
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_DETECTIONS:
            raise KilnError(f"{flag} must be an integer in 1..{MAX_DETECTIONS}, got {v}")


def append_detection(graph: Graph, heads: Sequence, *, conf: float = 0.25, iou: float = 0.45, max_det: int = 100,
                     letterbox: bool = True, class_agnostic: bool = False,
                     pre_nms_top_k: int = DEFAULT_PRE_NMS_TOP_K) -> Graph:
    """Replace `graph`'s YOLO head outputs by decode + NMS (module doc); returns the same graph, changed.

    heads: the network's yolo layers (kiln.frontend.darknet.YoloHead: output name, mask, anchors, classes,
    scale_x_y, new_coords), each naming one graph output. The graph's first input is the image [N, C, H, W]
    with a static H and W (the decode's input size). Scores above `conf` are candidates; a box is suppressed
    by a kept box of its class (any class with class_agnostic) overlapping it with IoU > `iou`."""
    from kiln.frontend.network import NetworkDefinition
    check_detect_options(conf, iou, max_det, pre_nms_top_k)
    if not heads:
        raise KilnError("--detect needs a network with [yolo] layers; this one has none")
    if not graph.inputs or graph.inputs[0].type is None or graph.inputs[0].type.shape is None \
            or len(graph.inputs[0].type.shape) != 4:
        raise KilnError("--detect needs an image input [N, C, H, W] as the network's first input")
    image = graph.inputs[0]
    batch, _, in_h, in_w = image.type.shape
    if not (isinstance(in_h, int) and isinstance(in_w, int)):
        raise KilnError(f"--detect needs a static input height and width, got {in_h} x {in_w}")
    classes = {h.classes for h in heads}
    if len(classes) != 1:
        raise KilnError(f"--detect needs every [yolo] layer to have the same classes=, got {sorted(classes)}")
    num_classes = classes.pop()
    if num_classes < 1:
        raise KilnError("--detect needs [yolo] layers with classes >= 1")
    outputs = {v.name: v for v in graph.outputs}
    for h in heads:
        if h.new_coords:
            raise KilnError(f"--detect: [yolo] layer {h.layer} has new_coords=1 (Scaled-YOLOv4's box coding), which "
                            "YoloDecode does not implement")
        if h.output not in outputs:
            raise KilnError(f"--detect: the network has no output '{h.output}' for [yolo] layer {h.layer}")
    if any(v.name == LETTERBOX_INPUT for v in graph.inputs):
        raise KilnError(f"--detect: the network already has an input named '{LETTERBOX_INPUT}'")

    nd = NetworkDefinition(graph.name, opset=graph.opsets.get("", 21))
    nd.graph = graph  # append to the imported graph (the network API over an existing Graph)
    lb: Value | None = None
    if letterbox:
        lb = nd.add_input(LETTERBOX_INPUT, DType.FLOAT32, (batch, 4))
    boxes, scores = [], []
    for h in heads:
        anchors = [float(v) for a in h.own_anchors for v in a]
        b, s = nd.add_layer("YoloDecode", [outputs[h.output], lb] if lb is not None else [outputs[h.output]],
                            num_outputs=2, name=f"decode_{h.output}", domain="kiln.plugins", anchors=anchors,
                            num_classes=num_classes, input_size=[in_h, in_w], scale_x_y=float(h.scale_x_y))
        boxes.append(b)
        scores.append(s)
    if len(heads) > 1:
        all_boxes = nd.add_layer("Concat", boxes, name="detect_boxes", axis=1)
        all_scores = nd.add_layer("Concat", scores, name="detect_scores", axis=1)
    else:
        all_boxes, all_scores = boxes[0], scores[0]
    dets = nd.add_layer("BatchedNMS", [all_boxes, all_scores], num_outputs=4, name="nms", domain="kiln.plugins",
                        score_threshold=float(conf), iou_threshold=float(iou), max_output_boxes=int(max_det),
                        class_agnostic=int(class_agnostic), pre_nms_top_k=int(pre_nms_top_k), box_coding=0)
    kept = [v for v in graph.outputs if v.name not in {h.output for h in heads}]
    graph.outputs = []
    for v, name in zip(dets, DETECTION_OUTPUTS):
        nd.mark_output(v, name)
    graph.outputs.extend(kept)  # outputs other than the heads (none in a Darknet import) stay, after the four
    return graph
