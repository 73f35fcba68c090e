//! Scaled sizes ("512M", "1G"), shared by vmctl and vm.conf.
