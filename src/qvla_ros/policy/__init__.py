"""π0 policies on the robot side: processor, runtime, training, evaluation (no ROS imports)."""
