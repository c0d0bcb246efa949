#!/bin/sh
echo "coverage is not available in the offline stub" >&2
exit 1
