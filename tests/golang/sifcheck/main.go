// sifcheck reads a SIF file with the reference Go library (github.com/sylabs/sif)
// and prints what it finds, so capsid's tests can compare against it.
//
//	sifcheck list FILE     one line per object: id group link isgroup offset size type name
//	sifcheck primary FILE  the primary system partition: fstype parttype arch offset size
package main

import (
	"fmt"
	"os"

	"github.com/sylabs/sif/v2/pkg/sif"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: sifcheck list|primary FILE")
		os.Exit(2)
	}
	f, err := sif.LoadContainerFromPath(os.Args[2], sif.OptLoadWithFlag(os.O_RDONLY))
	if err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(1)
	}
	defer f.UnloadContainer() //nolint:errcheck

	switch os.Args[1] {
	case "list":
		f.WithDescriptors(func(d sif.Descriptor) bool {
			link, isGroup := d.LinkedID()
			fmt.Printf("%d %d %d %t %d %d %d %s\n", d.ID(), d.GroupID(), link, isGroup,
				d.Offset(), d.Size(), int32(d.DataType()), d.Name())
			return false
		})
	case "primary":
		d, err := f.GetDescriptor(sif.WithPartitionType(sif.PartPrimSys))
		if err != nil {
			fmt.Fprintln(os.Stderr, "error:", err)
			os.Exit(1)
		}
		fs, pt, arch, err := d.PartitionMetadata()
		if err != nil {
			fmt.Fprintln(os.Stderr, "error:", err)
			os.Exit(1)
		}
		fmt.Printf("%s %s %s %d %d %s\n", fs, pt, arch, d.Offset(), d.Size(), f.PrimaryArch())
	default:
		fmt.Fprintln(os.Stderr, "unknown action", os.Args[1])
		os.Exit(2)
	}
}
