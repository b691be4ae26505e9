//go:build tools

// Package tools pins the helm command e2e/cluster/build compiles.
package tools

import _ "helm.sh/helm/v3/cmd/helm"
