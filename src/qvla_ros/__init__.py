"""qvla_ros: ROS 2 nodes for QVLA-quantized VLA policies, and the ROS-free control logic they use."""
