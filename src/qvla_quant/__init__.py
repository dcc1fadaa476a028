"""qvla_quant: action-centric, channel-wise mixed-precision quantization of VLA policies (QVLA). No ROS imports."""
