//go:build tools

// Package tools pins the kwok command e2e/cluster/build compiles.
package tools

import _ "sigs.k8s.io/kwok/cmd/kwok"
