"""Models: the IAGN teacher (ResNet backbone, three stage taps, fused head) and the student."""
