"""The platform model: priorities, pools and task routing, defined once and read everywhere."""
