"""The ground every module stands on: typed configuration, paths, errors and atomic file writes."""
