"""Starting workers: on this machine, on many hosts, and (rendered) on clusters."""
