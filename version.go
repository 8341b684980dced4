package hsmtransit

// Version is the plugin's semantic version, reported to Vault as its running
// version; `vault plugin register -version` must name the same one. Release
// builds set it with -ldflags "-X <module>.Version=vX.Y.Z".
var Version = "v0.1.0"
