"""ROS-free control logic of the policy node: everything that decides something, unit-tested without rclpy.

    images       sensor_msgs Image / CompressedImage fields <-> HxWx3 uint8 RGB arrays (encoding and step checked)
    sync         approximate-time synchronizer for the cameras, with a staleness limit
    scheduler    plays action chunks out on the control clock and blends overlapping chunks
    safety       joint limits, maximum change per tick, finite check, hold-last-safe with reasons
    loop         the policy node's decisions: observation gating, hold reasons, fault epochs, diagnostics
    arm_outputs  output message fields for each arm command interface (JointState, ros2_control, Y1 vendor),
                 and the measured-state parser
    messages     message classes by name, field dictionaries -> message objects, time fields
    timing       rate / jitter / latency monitors for fixed-rate loops
    params       the policy and sim node parameter schemas, defaults from config/bimanual.yaml
    worker       the inference worker (a thread, or a child process that talks over pipes without pickle)
    deviation    the monitor's action deviation against a full-precision reference

Objects that look like ROS messages are read by attribute (duck typing), so these modules never import rclpy.
"""
