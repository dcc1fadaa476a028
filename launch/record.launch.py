"""ros2 launch qvla_ros record.launch.py dataset:=DIR [sim:=true] [episodes:=N episode_time:=S reset_time:=S]

Teleoperated demonstrations -> one rosbag2 (MCAP) episode per demonstration in DIR: the recorder node (raw
subscriptions to the topics of config/topics.yaml; EpisodeControl on /qvla/recorder/episode), plus with sim:=true the
simulated rig driven by its scripted teleoperator on the leader-arm command topics (teleop:=false to drive it yourself).
With episodes:=N the episodes follow each other (episode_time, then reset_time) and the launch ends after N; keys
(right arrow keep, left arrow redo, Esc stop) need a terminal: run `qvla-recorder-node` directly for those. The node set
and every argument come from qvla_ros.bringup, which `qvla-bringup --launch record` (the launch-free runner) uses too.
"""

from qvla_ros.bringup import launch_description


def generate_launch_description():
    return launch_description("record")
